"""Make PEFT know LoRA-Mixer, as `peft.register_peft_method` would if `PeftType` were open.

PEFT looks methods up by `peft_type` in four dicts; we write our entries there, and make the model card of a
LoRA-Mixer adapter survive saving and pushing (see `hub`). Doing it twice is harmless.
"""

from __future__ import annotations

from peft import mapping

from .config import LoraMixerConfig, LoraMixerPeftType
from .experts.card_hooks import install_card_hooks
from .model import LoraMixerModel


def register() -> None:
    """Register the config, tuner, state-dict prefix and model card of LoRA-Mixer with PEFT (idempotent)."""
    peft_type = LoraMixerPeftType.LORAMIXER
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = LoraMixerConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = LoraMixerModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = LoraMixerModel.prefix
    install_card_hooks()
