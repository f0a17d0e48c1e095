"""Train a vprhub model: ``accelerate launch train.py --config training/salad.yaml`` (see ``--help``)."""

import sys

from vprhub.training import main

if __name__ == "__main__":
    sys.exit(main())
