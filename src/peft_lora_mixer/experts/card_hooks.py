"""Keep the LoRA-Mixer model card through `save_pretrained` and `push_to_hub`, touching no other PEFT method.

`PeftModel.save_pretrained` writes PEFT's card, then saves each adapter's config: our config's `save_pretrained`
(`card_folder` finds the card and the adapter's name) adds our section there. `push_to_hub` then overwrites README.md
with a card of transformers' own (the repository's current card, or a template) just before uploading; a PeftModel
that saved a LoRA-Mixer adapter therefore gets, on that instance only, an upload step that writes PEFT's card and our
sections again on the card about to be uploaded. The `PeftModel` class and other models are left as they are.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

from peft import PeftModel

from .card import add_mixer_section

_README = "README.md"


def card_folder(config_directory: str) -> Optional[tuple[str, str]]:
    """(folder of the card, adapter name) for a config PEFT saves into `config_directory`, or None without a card.

    PEFT saves the card in the save directory, the default adapter's config there too, and any other adapter's
    config in a subfolder named after it.
    """
    if os.path.isfile(os.path.join(config_directory, _README)):
        return config_directory, "default"
    parent = os.path.dirname(os.path.normpath(config_directory))
    if os.path.isfile(os.path.join(parent, _README)):
        return parent, os.path.basename(os.path.normpath(config_directory))
    return None


def keep_card_on_push(model: PeftModel) -> None:
    """Give this model (only) an upload step that puts PEFT's card and our sections back before uploading.

    A partial of a module-level function, so that the model still pickles and deep-copies (onto the copy).
    """
    if "_upload_modified_files" not in vars(model):
        model._upload_modified_files = functools.partial(_upload_with_card, model)


def _upload_with_card(model: PeftModel, working_dir: str, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    model.create_or_update_model_card(working_dir)
    for name, config in model.peft_config.items():
        if getattr(config, "peft_type", None) == "LORAMIXER":
            add_mixer_section(working_dir, name, config, repo_id)
    return type(model)._upload_modified_files(model, working_dir, repo_id, *args, **kwargs)
