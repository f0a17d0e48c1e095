"""Recall@K for visual place recognition, as an `evaluate` metric module.

Load it offline with ``evaluate.load(vprhub.evaluation.RECALL_METRIC_PATH)``.
"""

import datasets
import evaluate
import numpy as np

from vprhub.evaluation.recall import DEFAULT_K_VALUES, recalls_from_predictions

_DESCRIPTION = """
Recall@K of a place-recognition retrieval: the fraction of queries that have at least one
positive database image among their top-K retrieved images. This is the rule of the official
VPR evaluations (first-hit rule); a query without any positive stays in the denominator and
never counts as found.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per query, the retrieved database indices, best first
        (lists may differ in length; negative indices are padding and never count).
    references (`list` of `list` of `int`): per query, the indices of its positive database images
        (may be empty).
    k_values (`list` of `int`, *optional*, defaults to `[1, 5, 10]`): increasing cut-offs K.
Returns:
    `dict`: `recall@K` for each K, a fraction in [0, 1].
Examples:
    >>> recall = evaluate.load(vprhub.evaluation.RECALL_METRIC_PATH)
    >>> recall.compute(predictions=[[3, 1, 2], [0, 2, 1]], references=[[1], [4]], k_values=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5}
"""

_CITATION = """
@inproceedings{Berton_CVPR_2022_benchmark,
    author    = {Berton, Gabriele and Mereu, Riccardo and Trivigno, Gabriele and Masone, Carlo and
                 Csurka, Gabriela and Sattler, Torsten and Caputo, Barbara},
    title     = {Deep Visual Geo-localization Benchmark},
    booktitle = {CVPR},
    year      = {2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    """Recall@K over ranked database indices and per-query positive sets."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k_values=DEFAULT_K_VALUES) -> dict[str, float]:
        width = max((len(p) for p in predictions), default=0)
        if width == 0:
            raise ValueError("every query needs at least one prediction")
        ranked = np.full((len(predictions), width), -1, dtype=np.int64)
        for row, prediction in enumerate(predictions):
            ranked[row, : len(prediction)] = prediction
        recalls = recalls_from_predictions(ranked, references, k_values)
        return {f"recall@{k}": value for k, value in recalls.items()}
