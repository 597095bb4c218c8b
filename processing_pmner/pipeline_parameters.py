"""The options of the `multimodal-ner` pipeline (at creation or per call), checked and split into those of its
`preprocess`, `_forward` and `postprocess` steps.

This file is copied flat into saved model folders with the pipeline (remote code): it imports only its siblings
`pipeline_entities.py` and `pipeline_grounding.py` relatively.
"""

from .pipeline_entities import AGGREGATION_STRATEGIES
from .pipeline_grounding import check_grounding_threshold


OUTPUT_SCHEMES = ("BIO", "BIOES", "model")
DEFAULT_IGNORE_LABELS = ("O",)  # as in transformers' token-classification pipeline


def split_parameters(
    aggregation_strategy=None,
    ignore_labels=None,
    return_words=None,
    output_scheme=None,
    is_split_into_words=None,
    return_grounding=None,
    grounding_threshold=None,
    **kwargs,
) -> tuple[dict, dict, dict]:
    """`(preprocess, forward, postprocess)` parameters of the options given (`None`: not given); raises for an
    unknown option or value."""
    if kwargs:
        raise TypeError(f"the multimodal-ner pipeline got unknown arguments {sorted(kwargs)}")
    preprocess, forward, postprocess = {}, {}, {}
    if return_grounding is not None:
        forward["return_grounding"] = postprocess["return_grounding"] = bool(return_grounding)
    if grounding_threshold is not None:
        postprocess["grounding_threshold"] = check_grounding_threshold(grounding_threshold)
    if aggregation_strategy is not None:
        strategy = str(aggregation_strategy).lower()
        if hasattr(aggregation_strategy, "value"):  # transformers' AggregationStrategy enum
            strategy = str(aggregation_strategy.value).lower()
        if strategy not in AGGREGATION_STRATEGIES:
            raise ValueError(
                f"aggregation_strategy must be one of {AGGREGATION_STRATEGIES}, got {aggregation_strategy!r}"
            )
        postprocess["aggregation_strategy"] = strategy
    if ignore_labels is not None:
        if (
            isinstance(ignore_labels, (str, bytes, dict))
            or not hasattr(ignore_labels, "__iter__")
            or not all(isinstance(label, str) for label in ignore_labels)
        ):
            raise ValueError(f"ignore_labels must be a list of tags or entity types, got {ignore_labels!r}")
        postprocess["ignore_labels"] = tuple(ignore_labels)
    if return_words is not None:
        postprocess["return_words"] = bool(return_words)
    if output_scheme is not None:
        if output_scheme not in OUTPUT_SCHEMES:
            raise ValueError(f"output_scheme must be one of {OUTPUT_SCHEMES}, got {output_scheme!r}")
        postprocess["output_scheme"] = output_scheme
    if is_split_into_words is not None:
        preprocess["is_split_into_words"] = bool(is_split_into_words)
    return preprocess, forward, postprocess


__all__ = ["DEFAULT_IGNORE_LABELS", "OUTPUT_SCHEMES", "split_parameters"]
