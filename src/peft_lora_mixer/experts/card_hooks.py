"""Keep the LoRA-Mixer model card through `save_pretrained` and `push_to_hub`.

PEFT writes its card in `PeftModel.create_or_update_model_card` (called by `save_pretrained`), and transformers'
`push_to_hub` then overwrites README.md with a card of its own (the repository's current card, or a transformers
template) just before uploading. Both steps are wrapped here, for models holding a LoRA-Mixer adapter only: the
first adds our section to PEFT's card, the second runs PEFT's card step again on the card about to be uploaded, so
what reaches the Hub is the repository's card plus PEFT's metadata plus our section. Other models are untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Optional

from peft import PeftModel

from .card import add_mixer_section
from ..config import LoraMixerConfig


def install_card_hooks() -> None:
    """Wrap PEFT's card step and the upload step of `PeftModel` (idempotent)."""
    if getattr(PeftModel.create_or_update_model_card, "_loramixer_hook", False):
        return
    PeftModel.create_or_update_model_card = _card_step(PeftModel.create_or_update_model_card)
    PeftModel._upload_modified_files = _upload_step(PeftModel._upload_modified_files)


def _mixer_configs(model: PeftModel) -> dict[str, LoraMixerConfig]:
    return {name: config for name, config in model.peft_config.items() if isinstance(config, LoraMixerConfig)}


def _card_step(create_or_update_model_card: Callable) -> Callable:
    @functools.wraps(create_or_update_model_card)
    def wrapper(self: PeftModel, output_dir: str, repo_id: Optional[str] = None) -> None:
        create_or_update_model_card(self, output_dir)
        configs = _mixer_configs(self)
        if configs:
            add_mixer_section(output_dir, configs, self.get_base_model().name_or_path or None, repo_id)

    wrapper._loramixer_hook = True
    return wrapper


def _upload_step(upload_modified_files: Callable) -> Callable:
    @functools.wraps(upload_modified_files)
    def wrapper(self: PeftModel, working_dir: str, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if _mixer_configs(self):
            self.create_or_update_model_card(working_dir, repo_id=repo_id)
        return upload_modified_files(self, working_dir, repo_id, *args, **kwargs)

    return wrapper
