"""P-MNER configuration and model. Importing this package registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification

from .configuration_pmner import PMNERConfig, default_verbalizer, tag_names
from .modeling_pmner import (
    PMNERForTokenClassification,
    PMNERModel,
    PMNERModelOutput,
    PMNERPreTrainedModel,
    PMNERTokenClassifierOutput,
)


AutoConfig.register(PMNERConfig.model_type, PMNERConfig, exist_ok=True)
AutoModel.register(PMNERConfig, PMNERForTokenClassification, exist_ok=True)
AutoModelForTokenClassification.register(PMNERConfig, PMNERForTokenClassification, exist_ok=True)
# save_pretrained writes the code files and an auto_map, so the saved folder loads with trust_remote_code=True.
PMNERConfig.register_for_auto_class()
PMNERForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")

__all__ = [
    "PMNERConfig",
    "PMNERForTokenClassification",
    "PMNERModel",
    "PMNERModelOutput",
    "PMNERPreTrainedModel",
    "PMNERTokenClassifierOutput",
    "default_verbalizer",
    "tag_names",
]
