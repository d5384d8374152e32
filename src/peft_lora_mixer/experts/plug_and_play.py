"""`from_experts`: a mixer over existing LoRA adapters in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from peft import PeftModel, get_peft_model
from torch import nn

from ..config import LoraMixerConfig
from .sources import ExpertSourceLike


def from_experts(
    model: nn.Module,
    experts: Sequence[ExpertSourceLike],
    *,
    adapter_name: str = "default",
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    **config_kwargs: Any,
) -> PeftModel:
    """Mix existing LoRA adapters (Hub ids, folders) into `model`; the experts are frozen and only routers train.

    The same as `get_peft_model(model, LoraMixerConfig(experts=experts, **config_kwargs))`, plus the options used to
    fetch the experts from the Hub, which are not part of the saved config (a token must never be).
    """
    config = LoraMixerConfig(experts=list(experts), **config_kwargs)
    hub_kwargs = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    config.hub_kwargs = {key: value for key, value in hub_kwargs.items() if value}
    return get_peft_model(model, config, adapter_name=adapter_name)
