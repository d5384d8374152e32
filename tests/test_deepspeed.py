"""DeepSpeed ZeRO-2 and ZeRO-3 (every parameter partitioned) on 2 CPU processes (gloo), through the raw engine and
`Trainer(deepspeed=...)`, against one process on the same global batches; the adapter they save reloads equal.

Under ZeRO-3 the worker also runs what used to fail: `generate` before any forward through the engine,
`set_trainable` with the preservation term after partitioning, and a plain `save_pretrained` of partitioned
weights (refused, naming the calls that work). DeepSpeed runs on the CPU with `DS_ACCELERATOR=cpu`; its first run
builds a small shared-memory op with g++ (minutes, cached after).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed_worker import GLOBAL_BATCH, LEARNING_RATE, build_model, probe_inputs, step_batches
from domains import domain_base
from peft import PeftModel

pytest.importorskip("deepspeed")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PROCESSES = 2


def run_workers(out: Path, stage: int, *flags: str) -> dict:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{TESTS}",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES)]
    # --standalone: a free port, so that runs side by side on one machine do not collide
    command += ["--standalone", str(TESTS / "deepspeed_worker.py"), "--out", str(out)]
    command += ["--stage", str(stage), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "run.pt")


def one_process(rsl: bool, selected: bool) -> tuple[list[float], torch.nn.Module, torch.Tensor]:
    """The same steps in one process: each global batch as the processes' two micro-batches, accumulated (the task
    loss and the RSL averaged over them, as data parallelism averages the gradients), then one SGD step. Returns
    the per-step losses, the trained model, and what it generated before training."""
    model = build_model(rsl, selected)
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=probe_inputs()[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.train()
    model.set_trainable(routers=True, experts=True)
    model.base_model.routing_loss_accumulation_steps = PROCESSES
    share, losses = GLOBAL_BATCH // PROCESSES, []
    for batch in step_batches():
        step_losses = []
        for index in range(PROCESSES):
            loss = model(**{k: v[index * share : (index + 1) * share] for k, v in batch.items()}).loss
            (loss / PROCESSES).backward()
            step_losses.append(loss.item())
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param -= LEARNING_RATE * param.grad
                    param.grad = None
        losses.append(sum(step_losses) / PROCESSES)
    return losses, model.eval(), generated


CASES = [
    # (stage, trainer, rsl, selected)
    (2, False, True, False),
    (3, False, True, False),
    (3, False, False, False),
    (3, False, True, True),
    (2, True, True, False),
    (3, True, True, False),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage,trainer,rsl,selected", CASES)
def test_zero_matches_one_process_and_saves_an_adapter_that_reloads_equal(tmp_path, stage, trainer, rsl, selected):
    flags = [flag for flag, on in (("--trainer", trainer), ("--rsl", rsl), ("--selected", selected)) if on]
    result = run_workers(tmp_path, stage, *flags)
    losses, reference, generated = one_process(rsl, selected)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        expected = reference(input_ids=probe_inputs()).logits
        torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=1e-5)
        loaded = PeftModel.from_pretrained(domain_base(), tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=probe_inputs()).logits, expected, atol=1e-5, rtol=1e-5)
    if selected:
        assert result["selected_expert_calls"] > 0
    if stage == 3 and not trainer:
        assert torch.equal(result["generated"], generated)  # `generate` before any forward through the engine
        assert "partitioned across processes by DeepSpeed ZeRO-3" in result["save_refusal"]
        assert "GatheredParameters" in result["save_refusal"]
        assert not list((tmp_path / "refused").rglob("*.safetensors"))  # refused before any weights were written
