"""Which quantised base models LoRA-Mixer adapts: bitsandbytes' 4-bit (nf4, fp4) and 8-bit layers, and no others.

bitsandbytes' `Linear4bit` and `Linear8bitLt` are `torch.nn.Linear` subclasses whose forward takes and returns
floating-point activations, so the mixer wraps them as it wraps any Linear: the experts and routers are created in
float32 on the weight's device (never in the packed weight's integer dtype), and the quantised weight stays frozen.
The other methods transformers loads (GPTQ, AWQ, HQQ, torchao, ...) store their weights in layouts and tensor
subclasses that this package is not tested against, so they are refused before the model is touched.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

SUPPORTED_METHODS = ("bitsandbytes",)
SUPPORTED_DESCRIPTION = "bitsandbytes 4-bit (nf4, fp4: `load_in_4bit=True`) and 8-bit (`load_in_8bit=True`)"


def quantization_method(model: nn.Module) -> Optional[str]:
    """The `quant_method` of a transformers model loaded with a `quantization_config` (None when not quantised)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return getattr(method, "value", method)  # transformers' QuantizationMethod is a str Enum


def check_supported_quantization(model: nn.Module) -> None:
    """Refuse a base model quantised by a method the mixer does not handle, saying which ones it does."""
    method = quantization_method(model)
    if method is not None and method not in SUPPORTED_METHODS:
        raise ValueError(
            f"This base model is quantised with {method!r}, which LoRA-Mixer does not support. Supported quantised "
            f"bases: {SUPPORTED_DESCRIPTION}, e.g. `from_pretrained(..., quantization_config="
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))` (QLoRA); or load the base unquantised."
        )
