"""P-MNER processing (FRR image processor and prompt-template tokenizer).

Importing this package registers `PMNERImageProcessor` and `PMNERProcessor` with `AutoImageProcessor` /
`AutoProcessor` for `PMNERConfig`, and marks them for remote code: `processor.save_pretrained(folder)` copies
`processing_pmner.py`, `image_processing_pmner.py` and the siblings these import (`text_prompt_rows.py`, `text_tag_schemes.py`,
`text_word_start_spaces.py`, `text_windows.py`, `image_loading.py`, `image_frr_models.py`, `image_feature_cache.py`, ...) into
the folder, and `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` loads them without this package.
`train_pmner.py` adds the pipeline (`pipeline_pmner.py` with `pipeline_inputs.py`, `pipeline_entities.py`,
`pipeline_grounding.py`, `pipeline_quantization.py`, `text_retrieval_context.py`, `text_tweet_tokenizer.py`) the same way: the
files travel because they are imported relatively.
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
