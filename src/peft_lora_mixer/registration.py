"""Make PEFT know LoRA-Mixer, as `peft.register_peft_method` would if `PeftType` were open.

PEFT looks methods up by `peft_type` in its mapping dicts; we write our entries there (doing it twice is harmless).
Nothing else of PEFT is changed: our model card is written from our own config and tuner (see `model_card`).
"""

from __future__ import annotations

from peft import mapping

from .config import LoraMixerConfig, LoraMixerPeftType
from .model import LoraMixerModel


def register() -> None:
    """Register the config, tuner and state-dict prefix of LoRA-Mixer with PEFT (idempotent)."""
    peft_type = LoraMixerPeftType.LORAMIXER
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = LoraMixerConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = LoraMixerModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = LoraMixerModel.prefix
