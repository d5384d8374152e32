"""Register LoRA-Mixer with PEFT in any program that imports `peft`, without an explicit `import peft_lora_mixer`.

`peft_lora_mixer_autoregister.pth`, installed with the package at the root of site-packages, runs one line at
interpreter start-up: unless `PEFT_LORA_MIXER_AUTOREGISTER=0`, it puts a finder on `sys.meta_path` that ignores
every import but `peft`'s and imports nothing itself (not even this module, whose lookup on `sys.path` would cost
milliseconds in an editable install). The first time `peft` is imported, the finder calls `find_peft` (if this
module can still be found: a .pth left behind must not break `import peft`): PEFT's own loader runs, then
`peft_lora_mixer` is imported, which registers the method. Then a program that never names us
(lm-eval-harness's `peft=`, a TRL script, a notebook) loads LoRA-Mixer adapters with `PeftModel.from_pretrained`.

This module is top-level, outside the package, because importing anything inside `peft_lora_mixer` runs the
package's `__init__` (torch, transformers, peft).
"""

import sys
from importlib.machinery import ModuleSpec
from importlib.util import find_spec
from types import ModuleType
from typing import Optional

FINDER_NAME = "PeftLoraMixerAutoregister"  # the class the .pth line defines


def find_peft(name: str) -> Optional[ModuleSpec]:
    """PEFT's own spec, its loader wrapped to register LoRA-Mixer once PEFT is imported; the finders retire.

    The .pth line adds no second finder when it runs again (an installed package and a checkout's copy).
    """
    # once only, and so that the lookup below finds PEFT itself
    sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != FINDER_NAME]
    spec = find_spec(name)
    if spec is not None and spec.loader is not None:
        spec.loader = _RegisteringLoader(spec.loader)
    return spec


class _RegisteringLoader:
    """PEFT's loader, then our registration; PEFT's loader is put back on the module before its code runs."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()


def _register() -> None:
    try:
        import peft_lora_mixer  # noqa: F401  (its import registers LoRA-Mixer with PEFT)
    except Exception as error:  # a broken install must not break every program that imports peft
        import warnings

        warnings.warn(
            f"peft-lora-mixer could not register LoRA-Mixer with PEFT ({type(error).__name__}: {error}); its "
            "adapters will not load until `import peft_lora_mixer` works. Set PEFT_LORA_MIXER_AUTOREGISTER=0 to "
            "stop trying.",
            stacklevel=2,
        )
