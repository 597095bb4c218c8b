"""Inference Endpoints custom handler of a P-MNER model repository (copied into a saved model folder as `handler.py`).

Hugging Face Inference Endpoints load `handler.py` from the repository's root and call `EndpointHandler(path)(data)`.
This handler imports nothing from the P-MNER package: it builds the repository's own `multimodal-ner` pipeline
(`custom_pipelines` in `config.json`, loaded with `trust_remote_code=True`).

Request body (JSON):

    {"inputs": "a tweet" | ["its", "words"],
     "image": "<base64-encoded image bytes>",            (optional)
     "context": "auxiliary text",                         (optional)
     "parameters": {"aggregation_strategy": "first", ...}} (optional: the pipeline's arguments)

Answer: the pipeline's entities, a list of `{"entity_group", "score", "word", "start", "end"}`; for a request it
cannot serve, `{"error": "<what is wrong>"}` and nothing else.
"""

import base64
import binascii
import inspect
import io
from typing import Any


REQUEST_KEYS = ("inputs", "image", "context", "parameters")


class RequestError(ValueError):
    """A request body this handler cannot serve; its message is the answer's `error`."""


class EndpointHandler:
    def __init__(self, path: str = ""):
        from transformers import pipeline

        self.pipeline = pipeline(model=path or ".", trust_remote_code=True)  # the repository's multimodal-ner pipeline
        if type(self.pipeline).__name__ != "PMNERPipeline":
            raise RuntimeError(f"{path or '.'} did not give the P-MNER pipeline (got {type(self.pipeline).__name__})")
        signature = inspect.signature(self.pipeline._sanitize_parameters)
        self.parameters = sorted(
            name for name, parameter in signature.parameters.items() if parameter.kind is parameter.KEYWORD_ONLY
            or parameter.kind is parameter.POSITIONAL_OR_KEYWORD
        )

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | dict[str, str]:
        try:
            inputs, image, context, parameters = self.read_request(data)
        except RequestError as error:
            return {"error": str(error)}
        try:
            return self.pipeline(inputs, image=image, context=context, **parameters)
        except (TypeError, ValueError) as error:  # a value the pipeline refuses (e.g. an unknown strategy name)
            return {"error": f"{type(error).__name__}: {error}"}

    def read_request(self, data) -> tuple:
        """`(inputs, image, context, parameters)` of a request body; raises `RequestError` naming what is wrong."""
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(REQUEST_KEYS))
        if unknown:
            raise RequestError(f"unknown request keys {unknown}; expected {list(REQUEST_KEYS)}")
        if "inputs" not in data:
            raise RequestError('the request has no "inputs": give a tweet ("text") or its words (["a", "list"])')
        inputs = data["inputs"]
        if not isinstance(data.get("parameters") or {}, dict):
            raise RequestError(f'"parameters" must be a JSON object, got {type(data["parameters"]).__name__}')
        parameters = dict(data.get("parameters") or {})
        unknown = sorted(set(parameters) - set(self.parameters))
        if unknown:
            raise RequestError(f"unknown parameters {unknown}; this pipeline takes {self.parameters}")
        if isinstance(inputs, list) and inputs and all(isinstance(word, str) for word in inputs):
            parameters.setdefault("is_split_into_words", True)  # one tweet given as its words
        elif not isinstance(inputs, str) or not inputs.strip():
            raise RequestError(f'"inputs" must be a non-empty string or a list of words, got {type(inputs).__name__}')
        context = data.get("context")
        if context is not None and not isinstance(context, str):
            raise RequestError(f'"context" must be a string, got {type(context).__name__}')
        return inputs, decode_image(data.get("image")), context, parameters


def decode_image(encoded):
    """The PIL image of base64-encoded image bytes (None for no image); raises `RequestError` for anything else."""
    if encoded is None:
        return None
    if not isinstance(encoded, str):
        raise RequestError(f'"image" must be base64-encoded image bytes (a string), got {type(encoded).__name__}')
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f'"image" is not valid base64: {error}') from error
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise RequestError(f'"image" is not a readable image ({len(raw)} bytes): {error}') from error
    return image.convert("RGB")
