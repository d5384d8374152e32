"""The mixture computed over the selected experts only: tokens grouped by expert, one grouped matrix multiply each
for A and B. Worth it when few of many experts are selected (see `prefer_selected_experts`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Set by `python -m benchmarks.crossover` (one 512 -> 512 projection, rank-8 experts, `topk`, fp32, one CPU thread
# of a shared 2-core machine). Time of the selected-experts path / the dense path, for a training step, inference:
#   1024 tokens: E=8 k=1 0.95, 1.00 | E=16 k=2 1.03, 1.05 | E=16 k=1 0.60, 0.87 | E=32 k=2 0.78, 0.88
#                E=64 k=2 0.64, 0.64
#    256 tokens: E=8 k=1 0.98, 1.04 | E=16 k=2 0.93, 1.06 | E=16 k=1 0.79, 0.83 | E=32 k=2 0.86, 0.85
#                E=64 k=2 0.73, 0.69
#      4 tokens: 1.2 to 1.8 for every E up to 64 (the fixed cost of grouping the rows dominates)
# so it wins once E / k >= 16 with a few hundred tokens per call, and is break-even at E / k = 8.
MIN_EXPERTS_PER_SELECTED = 16
MIN_TOKENS = 256


def prefer_selected_experts(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether computing only the selected experts beats the dense wide LoRA, by the measured crossover."""
    return num_experts >= MIN_EXPERTS_PER_SELECTED * top_k and num_tokens >= MIN_TOKENS


def selected_experts_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, index: torch.Tensor,
                           weight: torch.Tensor, rank: int) -> torch.Tensor:
    """`sum_j weight[t, j] * B_e A_e x_t` with `e = index[t, j]`, computing no other expert.

    `lora_A` is (E * rank, in) and `lora_B` (out, E * rank), experts in consecutive blocks of `rank` slots; `index`
    and `weight` are (..., k) over the tokens of `x` (..., in). Each (token, expert) pair becomes one row; the rows
    are sorted by expert so that each expert multiplies one contiguous block of rows.
    """
    num_experts = lora_A.shape[0] // rank
    tokens = x.reshape(-1, x.shape[-1])
    expert = index.reshape(-1)
    order = expert.argsort(stable=True)
    token = order // index.shape[-1]
    ends = torch.searchsorted(expert[order], torch.arange(num_experts, device=x.device), right=True)
    ends = ends.to(torch.int32)
    hidden = F.grouped_mm(tokens[token], lora_A.view(num_experts, rank, -1).transpose(1, 2), offs=ends)
    hidden = hidden * weight.reshape(-1)[order].unsqueeze(-1).to(hidden.dtype)
    rows = F.grouped_mm(hidden, lora_B.view(-1, num_experts, rank).permute(1, 2, 0), offs=ends)
    delta = rows.new_zeros(tokens.shape[0], rows.shape[-1]).index_add(0, token, rows)
    return delta.view(*x.shape[:-1], -1)


def grouped_mm_supported(weight: torch.Tensor) -> bool:
    """Whether PyTorch's grouped matrix multiply can run here: eagerly on CPU, and on CUDA for bfloat16 from compute
    capability 8.0. Under `torch.compile` its shape checks accept only the CUDA case, so compiled CPU models keep
    the dense path (which compiles without graph breaks)."""
    if weight.device.type == "cpu":
        return not torch.compiler.is_compiling()
    return weight.device.type == "cuda" and weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(
        weight.device) >= (8, 0)
