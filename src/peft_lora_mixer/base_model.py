"""Loading a base model and its tokenizer from a Hub id, a folder, or a GGUF file.

A GGUF file is loaded dequantised (`GgufConfig(dequantize=True)`): transformers' default keeps GGUF's quantiser on
the model, which refuses `save_pretrained` ("quantized with gguf and is not serializable"), and an export, a
serving folder or a trained mixer's base must be saveable. The weights are then the file's, unpacked to `dtype`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Union

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

GGUF_SUFFIX = ".gguf"


def load_base_model(name_or_path: Union[str, Path], dtype: str = "float32") -> PreTrainedModel:
    """The base model, causal or encoder-decoder as its config says, in `dtype` (`"auto"`: the checkpoint's)."""
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(name_or_path) else AutoModelForCausalLM
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if is_gguf(name_or_path):
        folder, file = _gguf_location(name_or_path)
        return auto.from_pretrained(
            folder, gguf_file=file, dtype=torch_dtype, quantization_config=GgufConfig(dequantize=True)
        )
    return auto.from_pretrained(name_or_path, dtype=torch_dtype)


def load_tokenizer(name_or_path: Union[str, Path]) -> PreTrainedTokenizerBase:
    """The base model's tokenizer: from its folder or Hub id, or the one a GGUF file carries."""
    if is_gguf(name_or_path):
        folder, file = _gguf_location(name_or_path)
        return AutoTokenizer.from_pretrained(folder, gguf_file=file)
    return AutoTokenizer.from_pretrained(name_or_path)


def load_config(name_or_path: Union[str, Path]) -> PretrainedConfig:
    if is_gguf(name_or_path):
        folder, file = _gguf_location(name_or_path)
        return AutoConfig.from_pretrained(folder, gguf_file=file)
    return AutoConfig.from_pretrained(name_or_path)


def is_encoder_decoder(name_or_path: Union[str, Path]) -> bool:
    return bool(getattr(load_config(name_or_path), "is_encoder_decoder", False))


def is_gguf(name_or_path: Union[str, Path]) -> bool:
    """Whether the base is a GGUF file (by its name, so a missing file gets the error below, not a Hub lookup)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def _gguf_location(path: Union[str, Path]) -> tuple[Path, str]:
    """(folder, file name), as transformers' `from_pretrained(folder, gguf_file=name)` wants them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; give the path of a local .gguf file.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading a GGUF file needs the `gguf` package: pip install 'peft-lora-mixer[real]'.")
    return path.parent, path.name
