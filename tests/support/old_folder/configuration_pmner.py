"""P-MNER model configuration."""

from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig


ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
TAG_SCHEMES = ("BIO", "BIOES")
FUSIONS = ("tcfm", "concat")
HEADS = ("verbalizer", "linear")

# Default label words (section 3.4): a tag is verbalised as its position word plus its type word,
# e.g. "B-PER" -> ["begin", "person"]; "O" -> ["none"]. Their embeddings are averaged.
POSITION_WORDS = {"B": "begin", "I": "inside", "E": "end", "S": "single"}
TYPE_WORDS = {
    "PER": "person",
    "LOC": "location",
    "ORG": "organization",
    "MISC": "miscellaneous",
    "OTHER": "other",
}
OUTSIDE_WORDS = ["none"]


def tag_names(tag_scheme: str = "BIO", entity_types=ENTITY_TYPES) -> list[str]:
    """All tags of a scheme, "O" first: BIO gives O, B-PER, I-PER, ...; BIOES adds E- and S-."""
    if tag_scheme not in TAG_SCHEMES:
        raise ValueError(f"tag_scheme must be one of {TAG_SCHEMES}, got {tag_scheme!r}")
    positions = [letter for letter in tag_scheme if letter != "O"]
    return ["O"] + [f"{position}-{entity}" for entity in entity_types for position in positions]


def default_verbalizer(tags) -> dict[str, list[str]]:
    """English label words for each tag: the position word and the entity-type word."""
    verbalizer = {}
    for tag in tags:
        if tag == "O":
            verbalizer[tag] = list(OUTSIDE_WORDS)
            continue
        position, _, entity = tag.partition("-")
        words = [POSITION_WORDS.get(position, position.lower()), TYPE_WORDS.get(entity, entity.lower())]
        verbalizer[tag] = words
    return verbalizer


PIPELINE_TASK = "multimodal-ner"  # the pipeline task of P-MNER models (`custom_pipelines` of a saved folder)
TOKEN_CLASSIFICATION_TASKS = ("token-classification", "ner")  # transformers' names that lead to it too


class PMNERConfig(PreTrainedConfig):
    r"""
    Configuration of a P-MNER model: a pretrained masked LM (`text_config`), the FRR object features, the text
    correction fusion module (TCFM) and the prompt head with its verbalizer.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the masked language model backbone (anything `AutoModelForMaskedLM` accepts: BERT,
            RoBERTa, DistilBERT, ...). Defaults to a `bert-base-uncased`-sized BERT.
        visual_feature_dim (`int`, defaults to 2048):
            Width of one object feature (ResNet-152's pooled last stage).
        max_objects (`int`, defaults to 5):
            Most objects per image (FRR keeps the first `max_objects` detections above the score threshold).
        fusion_num_heads (`int`, defaults to 12):
            Heads of the text, visual and cross-modal attention layers (eq. 2-5). Must divide the hidden size.
        fusion_intermediate_size (`int`, *optional*):
            Width of the TCFM feed-forward network (eq. 7). Defaults to the backbone's `intermediate_size`.
        fusion_dropout (`float`, defaults to 0.1):
            Dropout in the fusion layers and before the head.
        use_visual (`bool`, defaults to `True`):
            Ablation switch: `False` ignores visual inputs and tags from text alone (H = T).
        fusion (`str`, defaults to `"tcfm"`):
            `"tcfm"`: the text correction fusion module (eq. 4-8). `"concat"`: the T+V baseline of Table 3 (text
            features concatenated with pooled object features, then projected).
        head (`str`, defaults to `"verbalizer"`):
            `"verbalizer"`: the masked-LM prediction transform scored against label-word embeddings (eq. 9-11).
            `"linear"`: a plain linear token classifier (the baseline).
        tag_scheme (`str`, defaults to `"BIO"`):
            `"BIO"` or `"BIOES"`; used to build `id2label` when it is not given. BIO is the default because it scored
            higher on validation than BIOES on both Twitter benchmarks (README, "Results measured here").
        entity_types (`list[str]`, *optional*):
            Entity types, defaults to PER, LOC, ORG, MISC.
        verbalizer (`dict[str, list[str]]`, *optional*):
            For each tag of `id2label`, its label words. Defaults to `default_verbalizer`.
        label_word_ids (`dict[str, list[list[int]]]`, *optional*):
            For each tag, the token ids of each of its label words, resolved with the backbone's tokenizer
            (`PMNERForTokenClassification.from_text_pretrained` fills it). Without it the label-word embeddings
            are a free parameter, initialised randomly.
        verbalizer_trainable (`bool`, defaults to `False`):
            `False`: label-word embeddings are read from the masked LM's input embeddings at every step (tied, as in
            the masked LM's own output layer). `True`: they start from those embeddings and are trained on their own
            (no better on validation in the README's runs, and more parameters).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialiser of the new layers.
    """

    model_type = "pmner"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    text_config: dict | PreTrainedConfig | None = None
    visual_feature_dim: int = 2048
    max_objects: int = 5
    fusion_num_heads: int = 12
    fusion_intermediate_size: int | None = None
    fusion_dropout: float = 0.1
    use_visual: bool = True
    fusion: str = "tcfm"
    head: str = "verbalizer"
    tag_scheme: str = "BIO"
    entity_types: list | None = None
    verbalizer: dict | None = None
    label_word_ids: dict | None = None
    verbalizer_trainable: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.entity_types is None:
            self.entity_types = list(ENTITY_TYPES)
        if self.id2label is None or kwargs.get("num_labels") is None and _is_placeholder(self.id2label):
            tags = tag_names(self.tag_scheme, self.entity_types)
            self.id2label = dict(enumerate(tags))
        self.label2id = {tag: index for index, tag in self.id2label.items()}
        if self.verbalizer is None:
            self.verbalizer = default_verbalizer(self.id2label.values())
        self.validate_pmner()

    def validate_pmner(self):
        """Checks the P-MNER settings; raises `ValueError` naming the setting at fault."""
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.tag_scheme not in TAG_SCHEMES:
            raise ValueError(f"tag_scheme must be one of {TAG_SCHEMES}, got {self.tag_scheme!r}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")
        if not isinstance(self.fusion_num_heads, int) or self.fusion_num_heads < 1:
            raise ValueError(f"fusion_num_heads must be a positive integer, got {self.fusion_num_heads!r}")
        if self.hidden_size % self.fusion_num_heads != 0:
            raise ValueError(
                f"fusion_num_heads={self.fusion_num_heads} must divide the text model's hidden size "
                f"{self.hidden_size}"
            )
        missing = [tag for tag in self.id2label.values() if not self.verbalizer.get(tag)]
        if missing:
            raise ValueError(f"verbalizer has no label words for the tags {missing}")
        if self.label_word_ids is not None:
            missing = [tag for tag in self.id2label.values() if not self.label_word_ids.get(tag)]
            if missing:
                raise ValueError(f"label_word_ids has no token ids for the tags {missing}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.from_pretrained`. Loaded by `transformers.pipeline("token-classification" or "ner",
        model=..., trust_remote_code=True)`, the config also names its P-MNER pipeline under that task, so
        transformers builds it instead of its plain token-classification pipeline (which would tag sub-words
        without the prompt template or the image). The extra name is never saved: a folder keeps one pipeline
        task, which `pipeline(model=...)` (no task) needs."""
        task = kwargs.get("_from_pipeline")  # the task of the `transformers.pipeline` call loading this config
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs) on request
        entry = (getattr(config, "custom_pipelines", None) or {}).get(PIPELINE_TASK)
        if task in TOKEN_CLASSIFICATION_TASKS and entry is not None:
            config.custom_pipelines = {**config.custom_pipelines, task: entry}
        return loaded

    def to_dict(self):
        output = super().to_dict()
        pipelines = output.get("custom_pipelines")
        if pipelines and PIPELINE_TASK in pipelines:  # the names `from_pretrained` adds for a pipeline call
            output["custom_pipelines"] = {
                task: entry for task, entry in pipelines.items()
                if task not in TOKEN_CLASSIFICATION_TASKS or entry != pipelines[PIPELINE_TASK]
            }
        return output

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def fusion_ffn_size(self) -> int:
        return self.fusion_intermediate_size or getattr(self.text_config, "intermediate_size", 4 * self.hidden_size)


def _is_placeholder(id2label) -> bool:
    return all(str(label) == f"LABEL_{index}" for index, label in id2label.items())


__all__ = ["PMNERConfig", "default_verbalizer", "tag_names"]
