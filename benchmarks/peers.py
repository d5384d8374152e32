"""The peers LoRA-Mixer is compared with, built the same way wherever they are measured (the demo, BIG-bench)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel, XLoraConfig, get_peft_model
from transformers import PreTrainedModel


def xlora_over(base: PreTrainedModel, expert_dirs: Sequence[Path]) -> PeftModel:
    """PEFT's X-LoRA over saved LoRA adapters (untrained: its classifier trains like our routers)."""
    base.config.use_cache = False  # X-LoRA's requirement
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.hidden_size,
        xlora_depth=1,
        # X-LoRA names its adapters "0", "1", ... internally; other names break its adapter switching
        adapters={str(index): str(folder) for index, folder in enumerate(expert_dirs)},
    )
    return get_peft_model(base, config)
