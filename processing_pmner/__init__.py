"""P-MNER processing: everything here travels with a saved model as remote code.

The files are grouped by prefix: `processing_pmner.py` (`PMNERProcessor`) with `text_*.py` (prompt rows, template,
label alignment, tag schemes, windows, tweet word splitting, retrieval context); `image_processing_pmner.py`
(`PMNERImageProcessor`, FRR) with `image_*.py` (settings, FRR networks and their weights, image loading, the feature
cache); `pipeline_pmner.py` (the `multimodal-ner` pipeline) with `pipeline_*.py` and `handler.py`.

Importing this package registers `PMNERImageProcessor` and `PMNERProcessor` with `AutoImageProcessor` /
`AutoProcessor` for `PMNERConfig`, and marks them for remote code: `processor.save_pretrained(folder)` copies
`processing_pmner.py`, `image_processing_pmner.py` and the siblings they import relatively into the folder, and
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` loads them without this package. The pipeline's
`add_pipeline_to_folder` adds `pipeline_pmner.py` and its siblings the same way. This `__init__.py` does not travel.
"""

from transformers import AutoImageProcessor, AutoProcessor

from modeling_pmner import PMNERConfig

from .image_processing_pmner import (
    BadImageError,
    BadImageWarning,
    FRRFeatureCache,
    PMNERImageProcessor,
    load_image,
    to_rgb,
)
from .processing_pmner import (
    PMNERBatchFeature,
    PMNERProcessor,
    TruncationWarning,
    bio_to_bioes,
    bioes_to_bio,
    check_processor_matches_model,
    convert_tags,
    split_words_match_running_text,
    tag_parts,
    tag_scheme_of,
    window_owner,
    with_word_start_spaces,
    word_windows,
)


AutoImageProcessor.register(PMNERConfig, image_processor_classes={"torchvision": PMNERImageProcessor}, exist_ok=True)
AutoProcessor.register(PMNERConfig, PMNERProcessor, exist_ok=True)
PMNERImageProcessor.register_for_auto_class("AutoImageProcessor")
PMNERProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "BadImageError",
    "BadImageWarning",
    "FRRFeatureCache",
    "PMNERBatchFeature",
    "PMNERImageProcessor",
    "PMNERProcessor",
    "TruncationWarning",
    "bio_to_bioes",
    "bioes_to_bio",
    "check_processor_matches_model",
    "convert_tags",
    "load_image",
    "split_words_match_running_text",
    "tag_parts",
    "tag_scheme_of",
    "to_rgb",
    "window_owner",
    "with_word_start_spaces",
    "word_windows",
]
