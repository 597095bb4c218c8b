"""int8 inference of the P-MNER pipeline (`pipeline(..., quantize="int8")`, `pmner-predict --quantize int8`): the
text encoder's feed-forward linear layers run with dynamically quantised int8 weights, on CPU.

This file is copied flat into saved model folders with the pipeline (remote code): it imports only torch and the
standard library.
"""

import warnings

import torch


QUANTIZE_OPTIONS = ("int8",)


def _check_cpu(device):
    device = torch.device("cpu" if device == -1 else device)
    if device.type != "cpu":
        raise ValueError(
            f"quantize='int8' runs on CPU only (dynamic int8 kernels are CPU kernels); the pipeline's device is "
            f"{device}: pass device='cpu' or leave quantize unset"
        )


def feed_forward_linears(model) -> list[str]:
    """Names of the text encoder's feed-forward `nn.Linear` layers: those to or from `intermediate_size` wide."""
    text_config = getattr(model.config, "text_config", None) or model.config
    width = getattr(text_config, "intermediate_size", None)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and width is not None and width in (module.in_features, module.out_features)
    ]


def quantize_dynamic_int8(model, device):
    """A copy of `model` whose text encoder's feed-forward `nn.Linear` layers compute with int8 weights (one scale
    per output channel) and dynamically quantised activations (`torch.ao.quantization.quantize_dynamic`).

    The feed-forward layers hold two thirds of the encoder's multiply-adds; the attention projections, the fusion
    layers and the prompt head stay in float, which keeps the tags nearly unchanged (on Twitter-2017 test, all
    linear layers in int8 lost 1.5 to 2.6 F1 points). CPU only: quantised kernels are CPU kernels."""
    _check_cpu(device)
    if torch.backends.quantized.engine == "none" or not torch.backends.quantized.supported_engines:
        raise RuntimeError("quantize='int8': this torch build has no quantized CPU engine")
    names = feed_forward_linears(model)
    if not names:
        raise ValueError(
            f"quantize='int8': no feed-forward linear layers (to or from intermediate_size) found in "
            f"{type(model).__name__}"
        )
    with warnings.catch_warnings():
        # torch marks its eager quantisation API as deprecated (in favour of torchao); it is what this build has
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*", category=UserWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        engine = torch.backends.quantized.engine
        try:
            # weights packed for oneDNN where available (the packed weights keep their kernels whatever the engine
            # later): on Twitter-2017 test 1.7x tweets/s of float and +0.3 F1, against 1.4x and -0.3 with x86
            if "onednn" in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = "onednn"
            quantized = torch.ao.quantization.quantize_dynamic(
                model, {name: qconfig for name in names}, dtype=torch.qint8, inplace=False
            )
        finally:
            torch.backends.quantized.engine = engine
    return quantized.eval()


__all__ = ["QUANTIZE_OPTIONS", "feed_forward_linears", "quantize_dynamic_int8"]
