"""Entity-level NER scores with seqeval, as an `evaluate` metric that loads offline.

`evaluate.load("seqeval")` fetches its script from the Hub and fails offline. This module is a
self-contained `evaluate.Metric` (it imports only evaluate, datasets and seqeval, so that `evaluate`
can copy it into its module cache and import it), loadable by path:

```python
import evaluate, training_pmner.seqeval_metric as m

metric = evaluate.load(m.__file__)          # or m.load_seqeval_metric()
metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])
```

Scores are those of the Hub's seqeval metric and of the MNER literature: seqeval in its default
(conlleval-compatible) mode, entity-level micro-averaged precision / recall / F1 overall and per type,
plus token accuracy. In default mode an entity may start with `I-` (e.g. `O I-PER`), as in conlleval.
Output keys: `overall_precision`, `overall_recall`, `overall_f1`, `overall_accuracy`, and per type
`{"PER": {"precision", "recall", "f1", "number"}, ...}` (`number`: gold entities of that type).
Values are plain Python floats / ints. Differences from the Hub script: `zero_division` defaults to 0
(the same values, without a warning per undefined score), and the inputs are checked (same number
of sequences, same length per sequence).
"""

import os
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report


_CITATION = """\
@inproceedings{ramshaw-marcus-1995-text,
  title = "Text Chunking using Transformation-Based Learning",
  author = "Ramshaw, Lance and Marcus, Mitch",
  booktitle = "Third Workshop on Very Large Corpora", year = "1995"}
@misc{seqeval,
  title={{seqeval}: A Python framework for sequence labeling evaluation},
  url={https://github.com/chakki-works/seqeval}, author={Hiroki Nakayama}, year={2018}}
"""

_DESCRIPTION = """\
Entity-level precision, recall and F1 (micro-averaged over entities, overall and per entity type) and
token accuracy of IOB-tagged sequences, computed with seqeval in its default, conlleval-compatible mode.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted tag sequences (one list of tag strings per sentence).
    references: list of gold tag sequences, aligned with `predictions`.
    suffix: tags are `PER-B` instead of `B-PER` (default False).
    scheme: a seqeval scheme name (`"IOB1"`, `"IOB2"`, `"IOE1"`, `"IOE2"`, `"IOBES"`, `"BILOU"`) for
        strict mode; default None (conlleval mode).
    mode: `"strict"` to use `scheme` strictly; default None.
    sample_weight: per-sentence weights (default None).
    zero_division: value of an undefined score, 0, 1 or `"warn"` (0 with a warning); default 0.
Returns:
    overall_precision, overall_recall, overall_f1, overall_accuracy, and for each entity type a dict
    with precision, recall, f1 and number (gold entities).
Examples:
    >>> metric = load_seqeval_metric()
    >>> metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])["overall_f1"]
    1.0
"""

_SCHEMES = ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU")


def _check_inputs(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]):
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predicted sequences but {len(references)} reference sequences")
    if len(references) == 0:
        raise ValueError("no sequences to score")
    predictions = [list(sequence) for sequence in predictions]
    references = [list(sequence) for sequence in references]
    for index, (predicted, gold) in enumerate(zip(predictions, references)):
        if len(predicted) != len(gold):
            raise ValueError(f"sequence {index}: {len(predicted)} predicted tags but {len(gold)} reference tags")
        for tag in predicted + gold:
            if not isinstance(tag, str):
                raise TypeError(f"sequence {index}: tags must be strings (map label ids first), got {tag!r}")
    return predictions, references


def _resolve_scheme(scheme: Optional[str]):
    if scheme is None:
        return None
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")
    import importlib

    return getattr(importlib.import_module("seqeval.scheme"), scheme)


def compute_ner_scores(
    predictions: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    suffix: bool = False,
    scheme: Optional[str] = None,
    mode: Optional[str] = None,
    sample_weight: Optional[Sequence[float]] = None,
    zero_division: Union[str, int] = 0,
) -> dict:
    """Entity-level micro P/R/F1 (overall and per type) and token accuracy, like the Hub seqeval metric.

    Args:
        predictions: predicted tag sequences (strings such as `"B-PER"`), one per sentence.
        references: gold tag sequences, same lengths.
        suffix, scheme, mode, sample_weight, zero_division: as in `seqeval.metrics.classification_report`
            (default: conlleval mode, undefined scores are 0).

    Returns:
        `{"PER": {"precision", "recall", "f1", "number"}, ..., "overall_precision", "overall_recall",
        "overall_f1", "overall_accuracy"}`, plain floats and ints.
    """
    predictions, references = _check_inputs(predictions, references)
    with warnings.catch_warnings():
        # Without any entity, seqeval's macro average is a mean over nothing (a numpy RuntimeWarning);
        # the macro average is dropped below.
        warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            scheme=_resolve_scheme(scheme),
            mode=mode,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
    report.pop("macro avg")
    report.pop("weighted avg")
    overall = report.pop("micro avg")
    scores: dict = {
        entity_type: {
            "precision": float(score["precision"]),
            "recall": float(score["recall"]),
            "f1": float(score["f1-score"]),
            "number": int(score["support"]),
        }
        for entity_type, score in report.items()
    }
    scores["overall_precision"] = float(overall["precision"])
    scores["overall_recall"] = float(overall["recall"])
    scores["overall_f1"] = float(overall["f1-score"])
    scores["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
    return scores


def ner_classification_report(
    predictions: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    digits: int = 4,
    suffix: bool = False,
    scheme: Optional[str] = None,
    mode: Optional[str] = None,
) -> str:
    """seqeval's per-type text report (precision, recall, F1, support; micro/macro/weighted averages)."""
    predictions, references = _check_inputs(predictions, references)
    return classification_report(
        y_true=references,
        y_pred=predictions,
        digits=digits,
        suffix=suffix,
        scheme=_resolve_scheme(scheme),
        mode=mode,
        zero_division=0,
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    """seqeval entity-level scores (default conlleval mode) as an offline-loadable `evaluate` metric."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            homepage="https://github.com/chakki-works/seqeval",
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("string")),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/chakki-works/seqeval"],
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def _compute(
        self,
        predictions,
        references,
        suffix: bool = False,
        scheme: Optional[str] = None,
        mode: Optional[str] = None,
        sample_weight=None,
        zero_division: Union[str, int] = 0,
    ):
        return compute_ner_scores(
            predictions,
            references,
            suffix=suffix,
            scheme=scheme,
            mode=mode,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )


def load_seqeval_metric(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of this file by path: works offline. `kwargs` go to `evaluate.load`."""
    return evaluate.load(os.path.abspath(__file__), **kwargs)
