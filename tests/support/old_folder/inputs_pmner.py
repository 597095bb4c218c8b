"""Checks and conversions of P-MNER's forward inputs: each error names the argument, the shape found and the
shape expected."""

import numpy as np
import torch


# `TransformersKwargs` P-MNER honours; any other keyword argument is refused (it would otherwise be lost silently).
SUPPORTED_KWARGS = ("num_items_in_batch",)


def check_kwargs(caller: str, kwargs: dict) -> None:
    """Raises `TypeError` naming the keyword arguments `forward` does not use."""
    unknown = sorted(set(kwargs) - set(SUPPORTED_KWARGS))
    if unknown:
        raise TypeError(
            f"{caller}.forward got unexpected keyword arguments {unknown}; besides its named arguments it accepts "
            f"only {list(SUPPORTED_KWARGS)}"
        )


def to_tensor(name: str, value, device: torch.device) -> torch.Tensor | None:
    """A NumPy array becomes a tensor on `device`; a tensor is returned as is; anything else is a `TypeError`."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"`{name}` is a NumPy array of Python objects; expected a numeric array or a torch.Tensor")
        return torch.from_numpy(np.ascontiguousarray(value)).to(device)
    raise TypeError(f"`{name}` is a {type(value).__name__}; expected a torch.Tensor or a NumPy array")


def check_labels(labels: torch.Tensor, text_shape: torch.Size) -> torch.Tensor:
    if labels.shape != text_shape:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)}; expected the shape of `input_ids`, {tuple(text_shape)}"
        )
    return labels


def check_inputs(
    config, embedding_dim, input_ids, inputs_embeds, attention_mask, token_type_ids, visual_features, visual_mask
):
    """Validates shapes and values (`embedding_dim`: the width of the text encoder's input embeddings); returns the visual features (padding objects zeroed) and the visual mask (all
    objects present when none is given). Raises `ValueError` naming the argument at fault."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` has shape {tuple(input_ids.shape)}; expected (batch, sequence_length)")
        text_shape, text_name = input_ids.shape, "input_ids"
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != embedding_dim:
            raise ValueError(
                f"`inputs_embeds` has shape {tuple(inputs_embeds.shape)}; expected (batch, sequence_length, "
                f"embedding size={embedding_dim})"
            )
        text_shape, text_name = inputs_embeds.shape[:2], "inputs_embeds"
    batch_size = text_shape[0]
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is not None and tensor.shape != text_shape:
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)}; expected the shape of `{text_name}`, {tuple(text_shape)}"
            )
    if visual_features is None:
        if visual_mask is not None and visual_mask.shape[0] != batch_size:
            raise ValueError(f"`visual_mask` has batch size {visual_mask.shape[0]}; expected {batch_size}")
        return None, visual_mask
    expected = f"(batch={batch_size}, objects<={config.max_objects}, visual_feature_dim={config.visual_feature_dim})"
    if visual_features.dim() != 3 or visual_features.shape[-1] != config.visual_feature_dim:
        raise ValueError(f"`visual_features` has shape {tuple(visual_features.shape)}; expected {expected}")
    if visual_features.shape[0] != batch_size:
        raise ValueError(
            f"`visual_features` has batch size {visual_features.shape[0]} but `{text_name}` has {batch_size}; "
            f"expected {expected}"
        )
    if visual_features.shape[1] > config.max_objects:
        raise ValueError(
            f"`visual_features` has {visual_features.shape[1]} objects, more than max_objects={config.max_objects}; "
            f"expected {expected}"
        )
    if visual_mask is None:
        visual_mask = torch.ones(visual_features.shape[:2], dtype=torch.bool, device=visual_features.device)
    elif visual_mask.shape != visual_features.shape[:2]:
        raise ValueError(
            f"`visual_mask` has shape {tuple(visual_mask.shape)}; expected (batch, objects) = "
            f"{tuple(visual_features.shape[:2])}"
        )
    visual_mask = visual_mask.bool()
    finite = torch.isfinite(visual_features).all(dim=-1)  # (B, objects)
    bad = ~finite & visual_mask
    if bad.any():
        rows = bad.any(dim=1).nonzero().flatten().tolist()
        objects = {row: bad[row].nonzero().flatten().tolist() for row in rows}
        raise ValueError(
            f"`visual_features` has non-finite values (NaN or inf) in the batch rows {rows} "
            f"(objects per row: {objects}); expected finite features for every object whose `visual_mask` is 1"
        )
    if not finite.all():  # only padding objects are non-finite: they are ignored, zero them so no NaN leaks
        visual_features = torch.where(visual_mask.unsqueeze(-1), visual_features, 0.0)
    return visual_features, visual_mask


__all__ = ["check_inputs", "check_kwargs", "check_labels", "to_tensor"]
