"""DeepSpeed ZeRO-3, whose parameters are partitioned across processes and gathered around each module's forward.

A `LoraMixerLayer` reads its adapter's weights directly (`F.linear(x, lora_A)`), never through the forward of the
ParameterDicts that hold them, so ZeRO-3 would leave them empty in the layer's forward; registered as the layer's
external parameters, they are gathered with it (in every forward, `generate` first included). What reads them
outside a forward (the preservation anchors, saving) must gather them (a collective: every process calls it) or
refuse. Nothing here imports DeepSpeed unless a parameter is partitioned.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

SAVE_PARTITIONED_ERROR = (
    "The adapter's weights are partitioned across processes by DeepSpeed ZeRO-3 (empty tensors here), so "
    "`save_pretrained` would write shape-[0] tensors that cannot be loaded: {keys}. Save with the Trainer "
    "(`trainer.save_model(...)` with `stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed config), "
    "or gather the weights on every process first: `with deepspeed.zero.GatheredParameters(list(model.parameters())):"
    " model.save_pretrained(...)` (call it on all processes; only the main one needs to write)."
)


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages `param` (its local tensor is then a shard, or empty outside a forward)."""
    return hasattr(param, "ds_id")


def register_partitioned_weights(layers: Iterable[torch.nn.Module]) -> bool:
    """Register each layer's partitioned adapter parameters as its ZeRO-3 external parameters; False (and nothing
    done) while none is partitioned, e.g. before DeepSpeed has wrapped the model."""
    layers = list(layers)
    params = [(layer, param) for layer in layers for param in _adapter_parameters(layer) if is_partitioned(param)]
    if not params:
        return False
    import deepspeed

    for layer, param in params:
        deepspeed.zero.register_external_parameter(layer, param)
    return True


def _adapter_parameters(layer: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    for name in layer.adapter_layer_names:
        yield from getattr(layer, name).parameters()


@contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block the partitioned ones of `params` hold their full value (read-only); a no-op without any."""
    partitioned = [param for param in params if is_partitioned(param)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def check_not_partitioned(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse to save an adapter state dict whose tensors are ZeRO-3 shards (an adapter tensor is never empty)."""
    empty = sorted(key for key, value in state_dict.items() if value.numel() == 0)
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise RuntimeError(SAVE_PARTITIONED_ERROR.format(keys=shown))
