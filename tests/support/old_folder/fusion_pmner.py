"""P-MNER fusion layers: the text and object self-attention (eq. 2-3), the text correction fusion module TCFM
(eq. 4-8) and the T+V concatenation baseline of Table 3.

These layers always compute attention explicitly (they are small: at most `max_objects` objects per image), so
their attention weights are available whatever `attn_implementation` the text encoder uses.
"""

import torch
from torch import nn

from .configuration_pmner import PMNERConfig


def layer_norm_eps(config: PMNERConfig) -> float:
    """The text encoder's LayerNorm epsilon (DistilBERT's config has none: it uses 1e-12, as BERT)."""
    return getattr(config.text_config, "layer_norm_eps", 1e-12)


class PMNERAttention(nn.Module):
    """Multi-head attention of queries over keys/values with a key mask.

    A query with no valid key (a tweet whose image has no object) gets an all-zero output, bias included, instead
    of the NaN of a softmax over nothing: so a tweet without objects has V' = C = 0 and H = T at any weights.
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

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the attended values (B, Lq, hidden) and the attention weights (B, heads, Lq, Lk)."""
        query = self._split_heads(self.query(queries))  # (B, heads, Lq, d)
        key = self._split_heads(self.key(keys))  # (B, heads, Lk, d)
        value = self._split_heads(self.value(keys))  # (B, heads, Lk, d)
        scores = query @ key.transpose(-1, -2) / self.head_dim**0.5  # (B, heads, Lq, Lk)
        key_mask = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
        has_key = key_mask.any(dim=-1, keepdim=True)  # (B, 1, 1, 1)
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1) * has_key  # (B, heads, Lq, Lk); 0 with no key
        context = self.dropout(probs) @ value  # (B, heads, Lq, d)
        context = context.transpose(1, 2).reshape(queries.shape)  # (B, Lq, hidden)
        return self.output(context) * has_key[:, 0], probs  # (B, Lq, hidden); 0 (no bias) with no key


class PMNERSelfAttentionLayer(nn.Module):
    """Self-attention over one modality, as a residual sub-layer: LN(X + SA(X)) (eq. 2 for text, eq. 3 for objects).

    The residual keeps the pretrained encoder's features intact at initialisation.
    """

    def __init__(self, config: PMNERConfig):
        super().__init__()
        self.attention = PMNERAttention(config)
        self.dropout = nn.Dropout(config.fusion_dropout)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new states (B, L, hidden) and the attention weights (B, heads, L, L)."""
        attended, probs = self.attention(states, states, mask)  # (B, L, hidden)
        return self.LayerNorm(states + self.dropout(attended)), probs


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
        eps = layer_norm_eps(config)
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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns H (B, text length, hidden) and the three cross-attention weights, keyed by their output field."""
        cross, visual_to_text = self.visual_to_text(visual, text, text_mask)  # (B, objects, hidden), eq. 4-5
        fused = self.visual_norm(visual + self.dropout(cross))  # (B, objects, hidden), eq. 6
        fused = self.feed_forward_norm(fused + self.dropout(self.feed_forward(fused)))  # P: (B, objects, hidden), eq. 7
        visual_for_text, text_to_object = self.text_to_visual(text, visual, visual_mask)  # V': (B, text length, hidden)
        corrected, text_to_fused = self.text_to_fused(text, fused, visual_mask)  # C: (B, text length, hidden)
        fused_text = text + self.dropout(visual_for_text) + self.dropout(corrected)  # H: (B, text length, hidden), eq. 8
        attentions = {
            "object_to_text_attentions": visual_to_text,  # (B, heads, objects, text length)
            "text_to_object_attentions": text_to_object,  # (B, heads, text length, objects)
            "text_to_fused_object_attentions": text_to_fused,  # (B, heads, text length, objects)
        }
        return fused_text, attentions


class PMNERConcatFusion(nn.Module):
    """The T+V baseline of Table 3: each text feature concatenated with the mean of the object features."""

    def __init__(self, config: PMNERConfig):
        super().__init__()
        self.projection = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the fused text features (B, text length, hidden) and no attention weights (it has none)."""
        weights = visual_mask.to(visual.dtype).unsqueeze(-1)  # (B, objects, 1)
        pooled = (visual * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, hidden); zeros with no object
        pooled = pooled.unsqueeze(1).expand_as(text)  # (B, text length, hidden)
        fused = self.projection(self.dropout(torch.cat([text, pooled], dim=-1)))  # (B, text length, hidden)
        return self.LayerNorm(text + fused), {}


__all__ = ["PMNERAttention", "PMNERConcatFusion", "PMNERSelfAttentionLayer", "PMNERTextCorrectionFusion"]
