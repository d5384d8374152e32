"""The mixture computed over the selected experts only: tokens grouped by expert, one grouped matrix multiply each
for A and B. Worth it when few of many experts are selected (see `prefer_selected_experts`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The crossover of `python -m benchmarks.crossover` (figures in docs/benchmarks.md): grouping the rows has a fixed
# cost that only many experts per selected one and a few hundred tokens repay; `hard_soft` training adds two dense
# multiplies (its straight-through router gradient), so it needs twice the experts per selected one.
MIN_EXPERTS_PER_SELECTED = 16
MIN_EXPERTS_PER_SELECTED_STRAIGHT_THROUGH = 32
MIN_TOKENS = 256


def prefer_selected_experts(num_tokens: int, num_experts: int, top_k: int, straight_through: bool = False) -> bool:
    """Whether computing only the selected experts beats the dense wide LoRA, by the measured crossover.

    `straight_through`: the router also needs every expert's gradient (`hard_soft` in training).
    """
    per_selected = MIN_EXPERTS_PER_SELECTED_STRAIGHT_THROUGH if straight_through else MIN_EXPERTS_PER_SELECTED
    return num_experts >= per_selected * top_k and num_tokens >= MIN_TOKENS


def add_selected_experts(
    accumulator: torch.Tensor,
    tokens: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """`accumulator[t] + sum_j weight[t, j] * B_e A_e tokens[t]` with `e = index[t, j]`, computing no other expert.

    `tokens` is (T, in) and `accumulator` (T, out), the sum taken in the experts' compute dtype; `lora_A` is
    (E * rank, in) and `lora_B` (out, E * rank), experts in consecutive blocks of `rank` slots; `index` and `weight`
    are (..., k) over the T tokens. Each (token, expert) pair becomes one row; the rows are sorted by expert so that
    each expert multiplies one contiguous block of rows.
    """
    num_experts = lora_A.shape[0] // rank
    sorted_expert, order = index.reshape(-1).sort(stable=True)
    token = order // index.shape[-1]
    ends = torch.searchsorted(sorted_expert, torch.arange(num_experts, device=tokens.device), right=True)
    ends = ends.to(torch.int32)
    # whole-row gathers and scatters: advanced indexing (and its backward, `index_put`) is several times slower on CPU
    hidden = F.grouped_mm(tokens.index_select(0, token), lora_A.view(num_experts, rank, -1).transpose(1, 2), offs=ends)
    hidden = hidden * weight.reshape(-1).index_select(0, order).unsqueeze(-1).to(hidden.dtype)
    rows = F.grouped_mm(hidden, _expert_blocks_of_B(lora_B, num_experts, rank), offs=ends)
    return accumulator.to(rows.dtype).index_add(0, token, rows)


def _expert_blocks_of_B(lora_B: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """`lora_B` (out, E * rank) as the (E, rank, out) right-hand side of the grouped multiply.

    With autograd on, a contiguous copy: the backward multiplies the output gradient by each expert's B much faster
    against a contiguous (rank, out) block than against `rank` strided columns of `lora_B`, which pays for the copy
    (docs/design.md). The forward multiply is as fast either way, so without autograd it
    is a view.
    """
    if torch.is_grad_enabled():
        return lora_B.t().contiguous().view(num_experts, rank, -1)
    return lora_B.view(-1, num_experts, rank).permute(1, 2, 0)


def grouped_mm_supported(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> bool:
    """Whether PyTorch's grouped matrix multiply can run on these experts: eagerly on CPU, and on CUDA for bfloat16
    from compute capability 8.0, with every row it reads 16-byte aligned. Under `torch.compile` its shape checks
    accept only the CUDA case, so compiled CPU models keep the dense path (which compiles without graph breaks).

    The alignment: `grouped_mm` refuses operands whose strides are not multiples of 16 bytes ("strides should be
    multiple of 16 bytes"), so the rank, the input width and the output width (the contiguous copy of B's blocks in
    training) must each span a multiple of 16 bytes: fp32 ranks 4, 8, ..., bf16 ranks 8, 16, .... Other shapes use
    the dense path.
    """
    bytes_per_value = lora_A.element_size()
    if any(size * bytes_per_value % 16 for size in (rank, lora_A.shape[1], lora_B.shape[0])):
        return False
    if lora_A.device.type == "cpu":
        return not torch.compiler.is_compiling()
    return (
        lora_A.device.type == "cuda"
        and lora_A.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(lora_A.device) >= (8, 0)
    )


def straight_through_router_gradient(
    output: torch.Tensor,
    probs: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """`output` (the sum the selected experts' delta went into, (T, out)) unchanged, with `hard_soft`'s
    straight-through gradient reaching `probs` ((..., E) over the T tokens of `x`).

    The dense path's gates are `hard + probs - probs.detach()`, so every expert's probability, selected or not, gets
    `dL/dp_e = s_e <dL/d delta, B_e A_e x>`, while the experts' weights and `x` get gradient through the selected
    experts only (an unselected expert's gate is zero). The backward computes it as
    `s_e sum_r (x A_e^T)_r (dL/d delta B_e)_r`: two dense matrix multiplies, against the six of a dense training step.
    """
    return _StraightThroughRouterGradient.apply(output, probs, x, lora_A, lora_B, scaling)


class _StraightThroughRouterGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, probs, x, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, lora_A, lora_B, scaling)
        ctx.probs_shape = probs.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B, scaling = ctx.saved_tensors
        dtype = grad_output.dtype  # the forward's compute dtype (bfloat16 under autocast)
        num_experts = scaling.shape[0]
        hidden = F.linear(x.to(dtype), lora_A.to(dtype)).unflatten(-1, (num_experts, -1))
        upstream = (grad_output @ lora_B.to(dtype)).unflatten(-1, (num_experts, -1))
        grad_probs = (hidden * upstream).sum(-1, dtype=torch.float32) * scaling
        return grad_output, grad_probs.view(ctx.probs_shape), None, None, None, None
