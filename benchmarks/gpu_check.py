"""The GPU check, one command: CUDA correctness, no host synchronisation on the hot path, then the speed and memory
ratios of LoRA-Mixer against PEFT LoRA r=8 and X-LoRA, eager and compiled, on a 1B-class Llama in bf16.

    PYTHONPATH=src python -m benchmarks.gpu_check              # on one CUDA GPU (sized for 8 minutes on an H100)
    PYTHONPATH=src python -m benchmarks.gpu_check --tiny       # the same code on CPU at a tiny size (the tests run it)

Correctness, on two layers of the 1B model's widths, each on the default routing (`hard_soft`, top-2 of 8
experts) unless it says otherwise:
- forced routing equals PEFT LoRA holding the same weights (logits, float32);
- the device's float32 logits equal the CPU's;
- the loss under bf16 autocast is close to float32's;
- compiled training (inductor) gives eager's gradients, the RSL's included;
- `torch.cuda.set_sync_debug_mode("error")` around a training step and a decoding step: any host synchronisation
  raises (CUDA only).
Then the benchmark's rows (`python -m benchmarks`), measured back to back against their reference.
Exits non-zero when a correctness check fails; writes everything to `--json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import torch
from peft import LoraConfig, get_peft_model

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer

from .__main__ import format_table, run_workload
from .variants import default_variants, parse_only
from .workloads import WORKLOADS, Workload, miniature

# compiling a 22-layer model (training, then static-cache decoding) takes minutes of the budget per row: two
# compiled rows, the mixer's and its reference's
DEFAULT_ROWS = ["lora-r8-compiled", "xlora-8x8-k2", "mixer-e8-k2", "mixer-e8-k2-compiled", "mixer-e64-k2-topk"]
MIXER = dict(num_experts=8, top_k=2, r=8, lora_alpha=16, init_weights=False)


def forced_routing_equals_lora(workload: Workload) -> dict:
    """Expert 2 forced on every token equals PEFT LoRA with expert 2's A and B (float32, on the device)."""
    targets = list(workload.target_modules)
    mixer = get_peft_model(_model(workload, torch.float32), LoraMixerConfig(**MIXER, target_modules=targets))
    lora = get_peft_model(_model(workload, torch.float32), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    modules = dict(lora.named_modules())
    rows = slice(2 * 8, 3 * 8)
    with torch.no_grad():
        for name, layer in mixer.named_modules():
            if isinstance(layer, LoraMixerLayer):
                modules[name].lora_A["default"].weight.copy_(layer.loramixer_A["default"][rows])
                modules[name].lora_B["default"].weight.copy_(layer.loramixer_B["default"][:, rows])
        ids = _ids(workload, 2, 64)
        with mixer.route_to(2):
            routed = mixer(input_ids=ids).logits
        expected = lora(input_ids=ids).logits
    return _compare(routed, expected, rtol=1e-3, atol=1e-3)


def device_equals_cpu(workload: Workload) -> dict:
    """The device's float32 logits equal the CPU's, routing included (the top-k picks the same experts)."""
    model = _mixer(workload, torch.float32).eval()
    ids = _ids(workload, 2, 64)
    with torch.no_grad():
        on_device = model(input_ids=ids).logits
        on_cpu = copy.deepcopy(model).cpu()(input_ids=ids.cpu()).logits
    return _compare(on_device.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


def bf16_autocast_loss_is_close(workload: Workload) -> dict:
    """The training loss under bf16 autocast within 2% of float32's (the router runs in float32 under autocast)."""
    model = _mixer(workload, torch.float32).train()
    ids = _ids(workload, 2, 64)
    with torch.no_grad():
        float32 = model(input_ids=ids, labels=ids).loss
        with torch.autocast(workload.device, dtype=torch.bfloat16):
            bf16 = model(input_ids=ids, labels=ids).loss
    return _compare(bf16, float32, rtol=2e-2, atol=0.0)


def compiled_equals_eager(workload: Workload, backend: str) -> dict:
    """One training step's gradients, compiled and eager, the RSL included (float32)."""
    eager = _mixer(workload, torch.float32, rsl_balance_weight=0.5, rsl_entropy_weight=0.3).train()
    compiled = copy.deepcopy(eager)
    ids = _ids(workload, 2, 64)
    eager(input_ids=ids, labels=ids).loss.backward()
    torch.compile(compiled, backend=backend, fullgraph=True)(input_ids=ids, labels=ids).loss.backward()
    worst = 0.0
    for expected, got in zip(eager.parameters(), compiled.parameters()):
        if expected.grad is not None:
            worst = max(worst, ((got.grad - expected.grad).norm() / expected.grad.norm().clamp_min(1e-12)).item())
    return dict(passed=worst <= 1e-4, max_relative_difference=worst)


def no_host_syncs(workload: Workload) -> dict:
    """A training step (forward, backward, optimizer step) and a decoding step of the default routing in bf16 under
    `set_sync_debug_mode("error")`: any host synchronisation raises. PEFT LoRA r=8 runs the same steps first, so
    that a synchronisation of transformers' own (a mask check, say) is told apart from one of the mixer's."""
    if workload.device != "cuda":
        return dict(passed=True, skipped="needs CUDA: host synchronisation is a CUDA notion")
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=list(workload.target_modules))
    lora = _host_syncs(get_peft_model(_model(workload, workload.dtype), lora_config), workload)
    mixer = _host_syncs(_mixer(workload, workload.dtype), workload)
    return dict(passed=all(mixer[step] in ("none", lora[step]) for step in mixer), mixer=mixer, lora=lora)


def _host_syncs(model, workload: Workload) -> dict[str, str]:
    """'none', or the error a host synchronisation raised, for a training step and a decoding step of `model`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _ids(workload, 2, 128)

    def train_step():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def decode_step(cache):
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids[:, -1:], cache=cache, use_cache=True)

    train_step()  # warm-up: lazy initialisation (optimizer state, cuBLAS handles) may synchronise once
    with torch.no_grad():
        cache = model.eval()(input_ids=ids, use_cache=True).cache
    decode_step(copy.deepcopy(cache))
    results = {}
    for name, step in [("train_step", train_step), ("decode_step", lambda: decode_step(cache))]:
        with _sync_debug_mode("error"):
            try:
                step()
                results[name] = "none"
            except RuntimeError as error:
                results[name] = str(error).splitlines()[0]
    return results


@contextmanager
def _sync_debug_mode(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _model(workload: Workload, dtype: torch.dtype):
    return workload.build().to(dtype)


def _mixer(workload: Workload, dtype: torch.dtype, **config):
    return get_peft_model(
        _model(workload, dtype), LoraMixerConfig(**MIXER, target_modules=list(workload.target_modules), **config)
    )


def _ids(workload: Workload, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(workload.config["vocab_size"], (batch, length), generator=generator).to(workload.device)


def _compare(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> dict:
    difference = (got.float() - expected.float()).abs()
    passed = bool((difference <= atol + rtol * expected.float().abs()).all())
    return dict(passed=passed, max_abs_difference=difference.max().item())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: the check's code in seconds")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="benchmark rows (lora-r8 always added)")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per row (median reported)")
    parser.add_argument("--gen-repeats", type=int, default=2, help="timed generation calls per row")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled checks")
    parser.add_argument("--no-benchmark", action="store_true", help="the correctness checks only")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workload = miniature(WORKLOADS["llama-1b-gpu"]) if args.tiny else WORKLOADS["llama-1b-gpu"]
    if workload.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU machine, or pass --tiny for the CPU miniature.")
    # the checks run on two layers of the workload's widths: float differences from the order of sums then do not
    # compound over 22 layers (nor flip near-tied top-k choices), and compiling takes seconds, not minutes
    checked = replace(
        workload, config=dict(workload.config, num_hidden_layers=min(2, workload.config["num_hidden_layers"]))
    )
    report = dict(
        device=torch.cuda.get_device_name() if workload.device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        workload=workload.name,
        checks={},
    )
    checks: dict[str, Callable[[], dict]] = {
        "forced_routing_equals_lora": lambda: forced_routing_equals_lora(checked),
        "device_equals_cpu": lambda: device_equals_cpu(checked),
        "bf16_autocast_loss_is_close": lambda: bf16_autocast_loss_is_close(checked),
        "compiled_equals_eager": lambda: compiled_equals_eager(checked, args.backend),
        "no_host_syncs": lambda: no_host_syncs(checked),
    }
    for name, check in checks.items():
        start = time.perf_counter()
        result = check()
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        print(f"{name}: {'ok' if result['passed'] else 'FAILED'} {result}", flush=True)
    if not args.no_benchmark:
        rows = parse_only(args.rows, default_variants(workload, ("hard_soft", "topk"), compiled=True))
        settings = argparse.Namespace(
            clock="wall",
            warmup=1,
            repeats=args.repeats,
            gen_repeats=args.gen_repeats,
            no_train=False,
            no_generate=False,
        )
        results = run_workload(workload, rows, settings)
        print("\n" + format_table(workload, results), flush=True)
        report["benchmark"] = results
    with open(args.json, "w") as out:
        json.dump(report, out, indent=1)
    print(f"wrote {args.json}")
    if not all(result["passed"] for result in report["checks"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
