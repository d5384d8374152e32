"""`from_experts`: a mixer over existing LoRA adapters in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from peft import PeftModel, get_peft_model
from torch import nn

from ..config import LoraMixerConfig
from .sources import ExpertSourceLike, hub_options


def from_experts(
    model: nn.Module,
    experts: Sequence[ExpertSourceLike],
    *,
    adapter_name: str = "default",
    cache_dir: Optional[str] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    **config_kwargs: Any,
) -> PeftModel:
    """Mix existing LoRA adapters (Hub ids, folders) into `model`; the experts are frozen and only routers train.

    The same as `get_peft_model(model, LoraMixerConfig(experts=experts, **config_kwargs))` inside
    `hub_options(cache_dir=..., token=..., local_files_only=...)`: the options used to fetch the experts from the Hub
    are arguments, never part of the config (which is saved, and a token must never be).
    """
    config = LoraMixerConfig(experts=list(experts), **config_kwargs)
    with hub_options(token=token, cache_dir=cache_dir, local_files_only=local_files_only):
        return get_peft_model(model, config, adapter_name=adapter_name)
