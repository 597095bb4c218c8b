"""P-MNER prompt head (section 3.4, eq. 9-10): the masked LM's prediction transform scored against the label
words' embeddings, and the helpers that resolve label words to token ids and start the head from a masked LM."""

import torch
from torch import nn

from transformers.activations import ACT2FN

from .configuration_pmner import PMNERConfig


# Where the masked-LM prediction-head transform (dense, activation, LayerNorm) sits in the masked-LM classes of
# transformers: (dense, layer norm) attribute paths. Used to start the prompt head from the pretrained MLM head.
MLM_HEAD_TRANSFORMS = (
    ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"),  # BERT and its relatives
    ("lm_head.dense", "lm_head.layer_norm"),  # RoBERTa, XLM-R, CamemBERT, ...
    ("vocab_transform", "vocab_layer_norm"),  # DistilBERT
    ("generator_predictions.dense", "generator_predictions.LayerNorm"),  # ELECTRA generator
)

# The word a label word follows when it is tokenised "in running text" (see `resolve_label_word_ids`).
RUNNING_TEXT_ANCHOR = "the"


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
        """The label embeddings (labels, hidden), on the device of the input embeddings when tied."""
        if self.label_embeddings is not None:
            return self.label_embeddings  # (labels, hidden)
        table = input_embeddings.weight
        # Indexed on the embedding's own device: with a `device_map` split, the head and the embeddings may differ.
        pieces = table[self.label_word_index.to(table.device)]  # (labels, pieces, hidden)
        weight = self.label_word_weight.to(device=table.device, dtype=pieces.dtype)
        return (pieces * weight.unsqueeze(-1)).sum(1)  # (labels, hidden)

    def forward(self, fused: torch.Tensor, input_embeddings: nn.Embedding) -> torch.Tensor:
        states = self.LayerNorm(self.transform_act_fn(self.dense(fused)))  # c_i = plm(h_i): (B, L, hidden), eq. 9
        labels = self.label_embedding_matrix(input_embeddings).to(device=states.device, dtype=states.dtype)
        return states @ labels.T + self.bias  # d_i = ver(c_i): (B, L, labels), eq. 10


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


def resolve_label_word_ids(verbalizer: dict, tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of each label word of each tag, as the word is tokenised in running text after a space.

    The word is encoded after an anchor word ("the person") and the anchor's own pieces are cut off, so every
    tokenizer family gives the pieces its encoder sees inside a sentence: `person` for WordPiece, `Ġperson` for
    byte-level BPE (RoBERTa, GPT-2 style), `▁person` for SentencePiece (XLM-R, ALBERT style).
    """
    anchor = tokenizer(RUNNING_TEXT_ANCHOR, add_special_tokens=False)["input_ids"]
    resolved = {}
    for tag, words in verbalizer.items():
        ids = []
        for word in words:
            text = f"{RUNNING_TEXT_ANCHOR} {word}"
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if encoded[: len(anchor)] != anchor:
                raise ValueError(
                    f"verbalizer: cannot tokenise the label word {word!r} of {tag!r} as running text with this "
                    f"tokenizer: {text!r} gives {tokenizer.convert_ids_to_tokens(encoded)}, which does not start "
                    f"with the pieces of {RUNNING_TEXT_ANCHOR!r} alone, {tokenizer.convert_ids_to_tokens(anchor)}"
                )
            pieces = encoded[len(anchor) :]
            if not pieces:
                raise ValueError(f"verbalizer: the label word {word!r} of {tag!r} gives no token with this tokenizer")
            ids.append(pieces)
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
        loaded += [
            f"verbalizer_head.{name}" for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")
        ]
        output = masked_lm.get_output_embeddings()
        bias = getattr(output, "bias", None)
        if bias is not None and not any(key.endswith("bias") and "decoder" in key for key in missing):
            for index in range(config.num_labels):
                pieces = [piece for word in label_word_ids[config.id2label[index]] for piece in word]
                head.bias[index] = bias[pieces].mean()
            loaded.append("verbalizer_head.bias")
        break
    return loaded


__all__ = ["PMNERVerbalizerHead", "copy_mlm_head", "label_word_index", "resolve_label_word_ids"]
