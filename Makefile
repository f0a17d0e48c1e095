# Two entry points for a fresh machine: `make demo` and `make test`.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.vprhub-installed

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU build of torch first, so that nothing below pulls a CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test,export]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vprhub demo --overwrite

# Headless Chromium + its WebDriver for the page test (Debian packages; installed only when missing).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver)

test: $(STAMP) browser
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
