"""Keep adapters on Mamba mixers in the computation when fused kernels are installed.

In training without a cache, transformers' Mamba mixers hand `out_proj.weight` (and Mamba-1's `x_proj.weight` and
`dt_proj.weight`) straight to a fused kernel instead of calling the modules, which would silently skip an adapter
on them. For a mixer with an adapted `out_proj` or `x_proj` we therefore run the mixer's own forward with its
`training` flag off: that takes the path that calls every projection as a module (the same path as evaluation,
still using the fused scan kernels), while the submodules, our adapters included, keep their own training flags.
`dt_proj.weight` is read directly on every path, so an adapter there is refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

KERNEL_READS_WEIGHT = ("out_proj", "x_proj")  # read as weights by the fused training kernel only
ALWAYS_READS_WEIGHT = ("dt_proj",)  # read as a weight on every path


def is_mamba_mixer(module: nn.Module) -> bool:
    """A Mamba(-2) mixer of transformers: an SSM (`A_log`) between `in_proj` and `out_proj`."""
    return all(hasattr(module, name) for name in ("A_log", "in_proj", "out_proj", "conv1d"))


def check_supported_ssm_target(parent: nn.Module, target_name: str, key: str) -> None:
    """Refuse a projection whose weight the mixer reads directly, so an adapter there could never act."""
    if is_mamba_mixer(parent) and target_name in ALWAYS_READS_WEIGHT:
        raise ValueError(
            f"Cannot adapt {key!r}: the Mamba mixer multiplies by `{target_name}.weight` directly instead of "
            f"calling the module, so an adapter there would be silently skipped. Remove {target_name!r} from "
            "`target_modules` (or add it to `exclude_modules`); the default targets are in_proj and out_proj."
        )


def needs_guard(parent: nn.Module, target_name: str) -> bool:
    """Whether adapting `parent.<target_name>` needs the mixer to avoid the fused training kernel."""
    return is_mamba_mixer(parent) and target_name in KERNEL_READS_WEIGHT


def guard_fused_mixer(mixer: nn.Module) -> None:
    """Make `mixer` call its adapted projections as modules in training (idempotent)."""
    if hasattr(mixer, "_loramixer_guard_handles"):
        return
    mixer._loramixer_guard_handles = (
        mixer.register_forward_pre_hook(_leave_training_for_forward),
        mixer.register_forward_hook(_restore_training_after_forward, always_call=True),
    )


def unguard_fused_mixers(model: nn.Module) -> None:
    """Remove every guard, leaving the mixers exactly as transformers built them."""
    for module in model.modules():
        for handle in getattr(module, "_loramixer_guard_handles", ()):
            handle.remove()
        if hasattr(module, "_loramixer_guard_handles"):
            del module._loramixer_guard_handles


def _leave_training_for_forward(mixer: nn.Module, args: tuple) -> None:
    mixer._loramixer_was_training = mixer.training
    mixer.training = False  # this module only; its children (our adapters included) keep their flags


def _restore_training_after_forward(mixer: nn.Module, args: tuple, output: Any) -> None:
    mixer.training = mixer._loramixer_was_training
