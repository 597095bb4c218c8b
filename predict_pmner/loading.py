"""The `multimodal-ner` pipeline of a P-MNER model folder or Hub id, as `pmner-predict` and the demo (`app.py`) load
it: this package's classes, or with `trust_remote_code` the code saved in the model folder."""


def load_pipeline(
    model: str, device: str | int | None, aggregation_strategy: str | None = None, trust_remote_code: bool = False,
    quantize: str | None = None, retrieval_index: str | None = None,
):
    """The `multimodal-ner` pipeline of a P-MNER folder or Hub id, with this package's classes (or, with
    `trust_remote_code`, with the code saved in the folder); `quantize="int8"`: int8 linear layers (CPU only).
    Options left `None` are not passed: the pipeline's defaults apply."""
    from transformers import pipeline

    options = {"aggregation_strategy": aggregation_strategy} if aggregation_strategy is not None else {}
    if quantize is not None:
        options["quantize"] = quantize
    if retrieval_index is not None:
        options["retrieval_index"] = retrieval_index
    if trust_remote_code:
        return pipeline("multimodal-ner", model=model, device=device, trust_remote_code=True, **options)
    import modeling_pmner  # noqa: F401  (registers the P-MNER classes with the Auto classes)
    import processing_pmner  # noqa: F401

    from processing_pmner.pipeline_pmner import PMNERPipeline, register_pipeline

    register_pipeline()
    return pipeline("multimodal-ner", model=model, device=device, pipeline_class=PMNERPipeline, **options)
