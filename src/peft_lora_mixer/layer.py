"""The LoRA-Mixer layer: one projection, its LoRA experts concatenated into one wide LoRA, and its router."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .routing import ROUTING, RouterSettings, Routes, forced_gates, gates_from_logits, top_k_routes
from .routing_loss.observation import RouterObservation, RoutingObserver
from .selected_experts import (
    add_selected_experts,
    grouped_mm_supported,
    prefer_selected_experts,
    straight_through_router_gradient,
)


@dataclass(frozen=True, eq=False)
class ExpertSpec:
    """Shape and scale of one expert on one projection (rank 0: absent there), and its factors when they were read
    from an adapter (the layer only needs the shape and scale)."""

    r: int
    scaling: float
    lora_A: Optional[torch.Tensor] = None  # (r, in_features)
    lora_B: Optional[torch.Tensor] = None  # (out_features, r)


def in_out_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported projection, or a clear error for anything else."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):  # GPT-2 style: weight is (in, out)
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    raise TypeError(
        f"LoRA-Mixer adapts torch.nn.Linear (bitsandbytes' 4-bit and 8-bit layers included) and transformers' Conv1D "
        f"projections, not {type(base_layer).__name__}. Remove this module from "
        "`target_modules` (or add it to `exclude_modules`); for a quantised base, load it with bitsandbytes instead "
        "(GPTQ, AWQ, HQQ and torchao layers are not supported)."
    )


class LoraMixerLayer(nn.Module, BaseTunerLayer):
    """Wraps a projection `W` and adds `sum_e g_e(x) s_e B_e A_e x`, computed as one wide LoRA.

    The experts' A matrices are stacked into `A_cat` (sum r_e x in) and their B matrices into `B_cat`
    (out x sum r_e); each rank slot carries the index of its expert. The forward is
    then two matrix multiplies whatever the number of experts: `h = x A_cat^T`, `h *= gate[slot_expert] * scale`,
    `delta = h B_cat^T`. When few of many equal-rank experts are selected per token, only the selected experts
    are computed instead (see `selected_routes`). The router is fed the undropped input and runs in float32.
    An expert without weights on this projection has no slots but keeps its place in the router: the router always
    routes over all E experts, and the share routed to such an expert changes nothing here.
    """

    adapter_layer_names = ("loramixer_A", "loramixer_B", "loramixer_router")
    # everything else kept per adapter, so that `delete_adapter` removes all of it
    other_param_names = (
        "loramixer_slot_expert",
        "loramixer_expert_scaling",
        "loramixer_dropout",
        "router_settings",
        "expert_rank",
        "common_scaling",
    )

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        experts: Sequence[ExpertSpec],
        router_settings: Optional[dict[str, RouterSettings]] = None,
        **update_kwargs,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.loramixer_A = nn.ParameterDict()
        self.loramixer_B = nn.ParameterDict()
        self.loramixer_router = nn.ModuleDict()
        self.loramixer_dropout = nn.ModuleDict()
        # derived from the experts' specs at construction, so they are not saved (persistent=False)
        self.loramixer_slot_expert = BufferDict(persistent=False)
        self.loramixer_expert_scaling = BufferDict(persistent=False)
        # how each adapter routes; in a model, one table shared by all its layers and kept by the tuner from the
        # adapters' configs (`LoraMixerModel.set_routing` changes it once for all)
        self.router_settings: dict[str, RouterSettings] = {} if router_settings is None else router_settings
        self.expert_rank: dict[str, Optional[int]] = {}  # the experts' common rank, None if they differ
        self.common_scaling: dict[str, Optional[float]] = {}  # the present experts' common scale, None if they differ
        self.forced_expert_ids: Optional[torch.Tensor] = None
        # set by the tuner while the RSL, the statistics or the gates are watched
        self.routing_observer: Optional[RoutingObserver] = None
        self._disable_adapters = False
        self.cast_input_dtype_enabled = True  # toggled by `peft.helpers.disable_input_dtype_casting`
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, experts, **update_kwargs)

    def update_layer(
        self,
        adapter_name: str,
        experts: Sequence[ExpertSpec],
        routing: str,
        top_k: int,
        router_temperature: float,
        lora_dropout: float,
        init_weights: bool,
    ) -> None:
        """Add (or replace) the experts and router of `adapter_name` on this projection."""
        ranks = [expert.r for expert in experts]
        if not any(ranks):
            raise ValueError(f"Adapter {adapter_name!r} has no expert on this projection.")
        slot_expert = torch.repeat_interleave(torch.arange(len(experts)), torch.tensor(ranks))
        expert_scaling = torch.tensor([e.scaling for e in experts], dtype=torch.float32)

        weight = self.get_base_layer().weight
        total_rank = int(sum(ranks))
        self.loramixer_A[adapter_name] = nn.Parameter(torch.empty(total_rank, self.in_features))
        self.loramixer_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, total_rank))
        self.loramixer_router[adapter_name] = nn.Linear(self.in_features, len(experts))
        self.loramixer_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.loramixer_slot_expert[adapter_name] = slot_expert
        self.loramixer_expert_scaling[adapter_name] = expert_scaling
        self.router_settings[adapter_name] = RouterSettings(routing, top_k, router_temperature, len(experts))
        self.expert_rank[adapter_name] = ranks[0] if len(set(ranks)) == 1 else None
        scalings = {expert.scaling for expert in experts if expert.r}
        self.common_scaling[adapter_name] = scalings.pop() if len(scalings) == 1 else None
        self.reset_parameters(adapter_name, ranks, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name, device=weight.device)
        self.set_adapter(self.active_adapters)

    def freeze_experts(self, adapter_name: str) -> None:
        """Keep the adapter's experts frozen (only its router trains), also through later `set_adapter` calls."""
        frozen = dict(self.frozen_peft_weight_names)
        frozen[adapter_name] = ("loramixer_A", "loramixer_B")
        self.frozen_peft_weight_names = frozen
        self._freeze_non_trainable_peft_weights(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's move to the base layer's device and dtype, except the experts' scales, which stay float32: PEFT
        LoRA keeps its scaling a Python float, never rounded to a half-precision base's dtype."""
        scaling = self.loramixer_expert_scaling[adapter_name] if adapter_name in self.loramixer_expert_scaling else None
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if scaling is not None:
            self.loramixer_expert_scaling[adapter_name] = scaling.to(self.loramixer_expert_scaling[adapter_name].device)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, ranks: Sequence[int], init_weights: bool) -> None:
        """Each expert's A as PEFT LoRA initialises it; B zero when `init_weights` (a no-op at start)."""
        for block in self.loramixer_A[adapter_name].split(list(ranks)):
            if block.numel():  # an expert absent from this projection has an empty block
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.loramixer_B[adapter_name])
        else:
            nn.init.normal_(self.loramixer_B[adapter_name], std=0.1)

    def router_logits(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The router's logits over all E experts in float32, divided by the temperature.

        An expert without weights on this projection keeps its logit: routing to it means "no change here". (Masking
        it out would leave an expert alone on a projection always fully on there, whatever the router learns.)
        """
        device_type = "cpu" if x.is_cpu else x.device.type  # `x.device` builds an object: slow on every decoding step
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                return self.router_logits(x, adapter_name)
        router = self.loramixer_router[adapter_name]
        temperature = self.router_settings[adapter_name].temperature
        float32 = torch.float32
        logits = F.linear(_as_dtype(x, float32), _as_dtype(router.weight, float32), _as_dtype(router.bias, float32))
        return logits if temperature == 1.0 else logits / temperature

    def router_probs(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Softmax of the router logits in float32, over all E experts."""
        return torch.softmax(self.router_logits(x, adapter_name), dim=-1)

    def observed_probs(
        self, logits: torch.Tensor, adapter_name: str, token_shape: torch.Size
    ) -> Optional[torch.Tensor]:
        """`softmax(logits)`, shown to the routing observer (RSL, statistics) when one is set; None when neither the
        observer nor autograd needs the probabilities (inference routes on the logits alone). `token_shape` is the
        shape of the tokens the rows of `logits` came from (batch x length), which the observer matches with the
        padding mask."""
        if self.routing_observer is None:
            return torch.softmax(logits, dim=-1) if logits.requires_grad else None
        router = RouterObservation(
            layer_id=id(self),
            adapter_name=adapter_name,
            logits=logits,
            probs=torch.softmax(logits, dim=-1),
            token_shape=token_shape,
            settings=self.router_settings[adapter_name],
            experts=(self.loramixer_A[adapter_name], self.loramixer_B[adapter_name]),
        )
        return self.routing_observer.observe(router)

    def gates(self, x: torch.Tensor, adapter_name: str, token_shape: Optional[torch.Size] = None) -> torch.Tensor:
        """Per-token expert weights (float32, (..., E) over the tokens of `x`), or the forced one-hot of `route_to`.

        `token_shape`: where `x` holds flattened tokens, the shape they had (batch first), which `route_to`'s
        per-sample ids and the observer's padding mask refer to; by default `x.shape[:-1]`.
        """
        token_shape = x.shape[:-1] if token_shape is None else token_shape
        settings = self.router_settings[adapter_name]
        if self.forced_expert_ids is not None:
            one_hot = forced_gates(self.forced_expert_ids, settings.num_experts, token_shape, x.device)
            return one_hot.expand(*token_shape, settings.num_experts).reshape(*x.shape[:-1], settings.num_experts)
        logits = self.router_logits(x, adapter_name)
        probs = self.observed_probs(logits, adapter_name, token_shape)
        return gates_from_logits(logits, probs, settings.mode, settings.top_k)

    def selected_routes(
        self, x: torch.Tensor, adapter_name: str, token_shape: Optional[torch.Size] = None
    ) -> Optional[Routes]:
        """The experts each token uses and their gates, when computing only those is exact and faster.

        Exact whenever the forward gates are k-sparse: forced routing and the sparse modes of `routing.ROUTING`.
        A straight-through mode in training also needs the router gradient of every expert, which the routes carry
        as `straight_through_probs`. Faster by the measured crossover of `prefer_selected_experts`. None means: use
        the dense path. Both paths route with the mode's own `routes`, so they pick the same experts with the same
        weights. `token_shape` as for `gates`.
        """
        token_shape = x.shape[:-1] if token_shape is None else token_shape
        routing, top_k, _, num_experts = self.router_settings[adapter_name]
        mode = ROUTING[routing]
        forced = self.forced_expert_ids is not None
        if forced:
            top_k = 1
        elif not mode.is_sparse(top_k, num_experts):
            return None
        straight_through = mode.straight_through and not forced and torch.is_grad_enabled()
        if not prefer_selected_experts(x.numel() // x.shape[-1], num_experts, top_k, straight_through):
            return None
        rank = self.expert_rank[adapter_name]
        if rank is None or not grouped_mm_supported(
            self.loramixer_A[adapter_name], self.loramixer_B[adapter_name], rank
        ):
            return None
        if forced:
            return Routes(*top_k_routes(self.gates(x, adapter_name, token_shape), 1))
        logits = self.router_logits(x, adapter_name)
        return mode.routes(logits, self.observed_probs(logits, adapter_name, token_shape), top_k)

    def add_mixture(
        self, result: torch.Tensor, tokens: torch.Tensor, token_shape: torch.Size, adapter_name: str
    ) -> torch.Tensor:
        """`result + sum_e g_e(x) s_e B_e A_e dropout(x)` for the flattened `tokens` (T x in) and `result` (T x out),
        over all experts as two matrix multiplies, or over the selected ones only. `token_shape` is the shape the
        tokens had (batch first), for `route_to` and the padding mask.

        The second multiply adds into `result` itself (`addmm`). The sum is taken in the experts' dtype and rounded
        to `result`'s once, as PEFT LoRA does with float32 adapters on a bfloat16 model (under autocast, in its
        dtype).
        """
        lora_A, lora_B = self.loramixer_A[adapter_name], self.loramixer_B[adapter_name]
        inputs = self._cast_input_dtype(tokens, lora_A.dtype)
        dropout = self.loramixer_dropout[adapter_name]
        if not isinstance(dropout, nn.Identity):
            inputs = dropout(inputs)
        routes = self.selected_routes(tokens, adapter_name, token_shape)
        if routes is not None:
            mixed = self._add_selected_experts(result, inputs, routes, adapter_name)
        else:
            hidden = F.linear(inputs, lora_A)
            expert_gates = self.gates(tokens, adapter_name, token_shape)
            gated = self._gate_slots(hidden, _as_dtype(expert_gates, hidden.dtype), adapter_name)
            scaling = self.common_scaling[adapter_name]
            accumulator = _as_dtype(result, gated.dtype)
            mixed = torch.addmm(accumulator, gated, lora_B.t(), alpha=1.0 if scaling is None else scaling)
        return _as_dtype(mixed, result.dtype)

    def _add_selected_experts(
        self, accumulator: torch.Tensor, inputs: torch.Tensor, routes: Routes, adapter_name: str
    ) -> torch.Tensor:
        """`accumulator` plus the routed experts only, each weighted by its gate and scale; under `hard_soft` in
        training, with the straight-through gradient of every expert's router probability attached."""
        lora_A, lora_B = self.loramixer_A[adapter_name], self.loramixer_B[adapter_name]
        scaling = self.loramixer_expert_scaling[adapter_name]
        weight = routes.weight * scaling[routes.index]
        mixed = add_selected_experts(
            accumulator, inputs, lora_A, lora_B, routes.index, weight, self.expert_rank[adapter_name]
        )
        if routes.straight_through_probs is None:
            return mixed
        return straight_through_router_gradient(mixed, routes.straight_through_probs, inputs, lora_A, lora_B, scaling)

    def _gate_slots(self, hidden: torch.Tensor, expert_gates: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Each rank slot of `hidden` (tokens x slots) times its expert's gate (`expert_gates`: tokens x E), and its
        scale when the experts' scales differ (a common scale is applied by the caller's multiply).

        With one rank for all experts this is a broadcast over (expert, rank), which also keeps autograd from
        saving a (tokens x slots) copy of the gates; otherwise the gates are expanded to the slots. Not in place:
        autograd would then copy slices, which costs training more than the one operation it saves when decoding.
        """
        if self.common_scaling[adapter_name] is None:
            expert_gates = expert_gates * _as_dtype(self.loramixer_expert_scaling[adapter_name], expert_gates.dtype)
        rank = self.expert_rank[adapter_name]
        if rank is not None:
            num_experts = expert_gates.shape[-1]
            return (hidden.view(-1, num_experts, rank) * expert_gates.unsqueeze(-1)).view(-1, num_experts * rank)
        return hidden * expert_gates.index_select(-1, self.loramixer_slot_expert[adapter_name])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base projection plus each active adapter's mixture, on the tokens flattened once.

        Flat, every multiply (the base layer's too) is one BLAS call with no reshaping around it: at a decoding
        step, where the routing's small operations cost as much as the multiplies, every operation saved counts.
        """
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        token_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        result = self.base_layer(tokens, *args, **kwargs)
        for adapter_name in self.active_adapters:
            if adapter_name in self.expert_rank:  # this layer's own plain dict: cheaper to ask than the ParameterDict
                result = self.add_mixture(result, tokens, token_shape, adapter_name)
        return result.reshape(*token_shape, self.out_features)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def __repr__(self) -> str:
        return "loramixer." + super().__repr__()


def iter_mixer_layers(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[tuple[str, LoraMixerLayer]]:
    """(name, layer) of every LoRA-Mixer layer in `model`, or of those holding `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraMixerLayer) and (adapter_name is None or adapter_name in module.loramixer_A):
            yield name, module


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without a dispatcher call when it has that dtype already (it runs on every decoding step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


MERGE_ERROR = (
    "LoRA-Mixer cannot be merged into the base weights: its experts are weighted per token by a router that "
    "depends on the input, so no single weight matrix reproduces it. Keep the adapter unmerged (its routing costs "
    "two small matrix multiplies per projection), or call `unload()` to get the base model back without it."
)
