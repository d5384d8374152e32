"""Register LoRA-Mixer with PEFT in any program that imports `peft`, without an explicit `import peft_lora_mixer`.

`peft_lora_mixer_autoregister.pth`, installed with the package at the root of site-packages, runs one line at
interpreter start-up: unless `PEFT_LORA_MIXER_AUTOREGISTER=0`, it puts a finder on `sys.meta_path` that ignores
every import but `peft`'s and imports nothing itself (not even this module, whose lookup on `sys.path` would cost
milliseconds in an editable install). Whenever `peft` is looked up, the finder calls `find_peft` (if this
module can still be found: a .pth left behind must not break `import peft`), which returns PEFT's own spec with its
loader wrapped. Only when that loader runs (the real `import peft`) is `peft_lora_mixer` imported, which registers
the method, and the finder retires. A lookup without an import (`importlib.util.find_spec("peft")`, as transformers'
`is_peft_available()` does first) leaves the finder in place. Then a program that never names us (transformers'
`from_pretrained` of a folder holding an adapter, lm-eval-harness's `peft=`, a TRL script, a notebook) loads
LoRA-Mixer adapters.

This module is top-level, outside the package, because importing anything inside `peft_lora_mixer` runs the
package's `__init__` (torch, transformers, peft).
"""

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Optional

FINDER_NAME = "PeftLoraMixerAutoregister"  # the class the .pth line defines


def find_peft(
    name: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None
) -> Optional[ModuleSpec]:
    """PEFT's own spec, from the other finders, its loader wrapped to register LoRA-Mixer once PEFT is imported.

    The finder stays in place: lookups that import nothing may come any number of times before the import.
    """
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if type(finder).__name__ == FINDER_NAME or find is None:
            continue
        spec = find(name, path, target)
        if spec is not None:
            if spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
            return spec
    return None


class _RegisteringLoader:
    """PEFT's loader, then our registration; PEFT's loader is put back on the module before its code runs."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _retire()
        _register()


def _retire() -> None:
    """Take the finder off `sys.meta_path`: PEFT is imported, no later lookup needs it."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != FINDER_NAME]


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
