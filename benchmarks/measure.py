"""Timing and peak memory of one training step and of one greedy generation call."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.generation import CompileConfig

from .workloads import Workload


class Subject:
    """A model ready to benchmark: its optimizer, a fixed training batch and a fixed prompt."""

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        seq_len: int,
        prompt_len: int,
        new_tokens: int,
        vocab_size: int,
        device: str,
        clock: str = "wall",
        seed: int = 0,
        compiled: bool = False,
    ):
        generator = torch.Generator().manual_seed(seed)
        self.model = model
        self.compiled = compiled
        self.forward = torch.compile(model) if compiled else model
        self.device = device
        self.clock = clock
        self.input_ids = torch.randint(vocab_size, (batch, seq_len), generator=generator).to(device)
        self.prompt = self.input_ids[:, :prompt_len]
        self.new_tokens = new_tokens
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    @classmethod
    def of(cls, model: nn.Module, workload: Workload, clock: str = "wall", compiled: bool = False) -> Subject:
        """`model` with the batch and prompt shapes of `workload`, on its device (`compiled`: see `Variant`)."""
        return cls(
            model,
            workload.batch,
            workload.seq_len,
            workload.prompt_len,
            workload.new_tokens,
            model.config.vocab_size,
            workload.device,
            clock,
            compiled=compiled,
        )

    def train_step(self) -> float:
        """Seconds for forward, backward and optimizer step on the training batch."""
        self.model.train()
        start = _now(self.device, self.clock)
        loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _now(self.device, self.clock) - start

    @torch.no_grad()
    def generate(self) -> float:
        """Generated tokens per second (greedy, KV cache where the method allows it, prefill included); compiled:
        with a static cache, each decoding step one compiled graph, as transformers compiles generation."""
        self.model.eval()
        start = _now(self.device, self.clock)
        out = self.model.generate(
            input_ids=self.prompt,
            attention_mask=torch.ones_like(self.prompt),
            max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            **(_compiled_generation() if self.compiled else {}),
        )
        seconds = _now(self.device, self.clock) - start
        return (out.shape[0] * (out.shape[1] - self.prompt.shape[1])) / seconds

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def peak_train_memory(self) -> int:
        """Bytes: tensors held between steps (weights, optimizer state) plus the peak growth during one step."""
        held = sum(t.numel() * t.element_size() for t in _tensors_held(self.model, self.optimizer))
        with _peak_growth(self.device) as growth:
            self.train_step()
        return held + growth()

    def train_state_memory(self) -> int:
        """Bytes a training step holds by construction: weights, buffers and optimizer state, the gradients of the
        trainable parameters, and every tensor autograd saves for the backward (each storage once).

        Unlike the peak, which on CPU comes from the resident set and moves by tens of MiB between runs, this is
        exact and the same on every run and device; it leaves out only the short-lived buffers inside operations.
        """
        held = {_storage_key(t): _storage_bytes(t) for t in _tensors_held(self.model, self.optimizer)}
        gradients = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        saved: dict[tuple[int, str], int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.setdefault(_storage_key(tensor), _storage_bytes(tensor))
            return tensor

        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        activations = sum(size for key, size in saved.items() if key not in held)
        return sum(held.values()) + gradients + activations


def _compiled_generation() -> dict:
    """`generate` arguments that compile decoding; transformers does so by itself on accelerators only."""
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


def _storage_key(tensor: torch.Tensor) -> tuple[int, str]:
    return tensor.untyped_storage().data_ptr(), str(tensor.device)


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _now(device: str, clock: str) -> float:
    """Seconds on the wall clock, or of CPU time used by this process (`clock="cpu"`: on a shared machine it does not
    count the time other jobs hold the core, so a one-thread run gives steadier ratios)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.process_time() if clock == "cpu" else time.perf_counter()


def _tensors_held(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    states = [t for state in (optimizer.state.values() if optimizer else ()) for t in state.values()]
    for tensor in [*model.parameters(), *model.buffers(), *states]:
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


@contextmanager
def _peak_growth(device: str) -> Iterator:
    """Peak growth of allocated memory inside the block.

    On CUDA: the caching allocator's own peak counter. On CPU, where PyTorch keeps no such counter: the process's
    resident-set high-water mark, reset through /proc/self/clear_refs after handing freed heap pages back to the
    system (malloc_trim), minus the resident set at the start. All rows of a workload share one process, but
    the other rows' memory does not change during the step measured, so the growth is this row's alone.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result: list[int] = []
        yield lambda: result[0]
        torch.cuda.synchronize()
        result.append(torch.cuda.max_memory_allocated() - before)
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    result = []
    yield lambda: result[0]
    result.append((_status_kib("VmHWM") - before) * 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
