"""The benchmark's exact training-memory count, and its GPU workload's code run in miniature."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, tiny_model

import peft_lora_mixer.layer
from benchmarks.measure import Subject
from benchmarks.tables import markdown_row, markdown_table
from benchmarks.variants import apply_variant, default_variants
from benchmarks.workloads import WORKLOADS, miniature


def subject(rank: int) -> Subject:
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]))
    measured = Subject(model, batch=2, seq_len=12, prompt_len=6, new_tokens=2, vocab_size=VOCAB, device="cpu")
    measured.train_step()  # the optimizer's state exists from the first step on
    return measured


def test_train_state_memory_is_exact_and_counts_what_training_holds():
    small, large = subject(4), subject(32)
    assert small.train_state_memory() == small.train_state_memory()  # no allocator or resident-set noise
    weights = sum(p.numel() * p.element_size() for p in small.model.parameters())
    trainable = small.trainable_parameters() * 4
    # weights, plus gradient and two AdamW moments per trainable parameter, plus the activations saved for backward
    assert small.train_state_memory() > weights + 3 * trainable
    extra_parameters = large.trainable_parameters() - small.trainable_parameters()
    extra = large.train_state_memory() - small.train_state_memory()
    assert extra >= 4 * extra_parameters * 4  # weight, gradient, two moments, float32
    assert extra < 4 * extra_parameters * 4 + 2**20  # plus the wider LoRA hidden states, nothing like a MiB


@pytest.mark.parametrize("row", ["lora-r8", "mixer-e8-k2", "mixer-e64-k2", "mixer-e64-k2-topk"])
def test_gpu_workload_rows_run_in_miniature_on_cpu(row, monkeypatch):
    """The GPU workload's code (bf16 weights, grouped-query attention, the selected-experts path at E=64) on CPU,
    shrunk: this machine has no GPU, so this is what runs of it here."""
    workload = miniature(WORKLOADS["llama-1b-gpu"])
    (variant,) = (v for v in default_variants(workload, ("hard_soft", "topk")) if v.name == row)
    model = apply_variant(workload.build(), variant, workload)
    measured = Subject(model, workload.batch, workload.seq_len, workload.prompt_len, workload.new_tokens, VOCAB, "cpu")
    selected_calls = []
    add_selected = peft_lora_mixer.layer.add_selected_experts
    monkeypatch.setattr(
        peft_lora_mixer.layer, "add_selected_experts", lambda *args: selected_calls.append(1) or add_selected(*args)
    )
    measured.train_step()
    assert bool(selected_calls) == row.startswith("mixer-e64")  # 256 tokens: the selected path from E/k = 32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)  # adapters: float32
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    assert measured.generate() > 0 and measured.train_state_memory() > 0


def test_markdown_table_pads_columns_and_refuses_ragged_rows():
    table = markdown_table(["row", "ms"], [["lora-r8", 1.5], ["mixer-e64-k2-topk", "-"]]).splitlines()
    assert table == [
        "| row               | ms  |",
        "| ----------------- | --- |",
        "| lora-r8           | 1.5 |",
        "| mixer-e64-k2-topk | -   |",
    ]
    assert markdown_row(["a", 2]) == "| a | 2 |"  # a row printed as it is measured, unpadded
    with pytest.raises(ValueError, match="2 cells under a header of 3"):
        markdown_table(["a", "b", "c"], [["x", "y"]])


def test_gpu_check_runs_in_miniature_on_cpu(tmp_path, monkeypatch):
    """`python -m benchmarks.gpu_check --tiny`: every correctness check passes and every row is measured, with the
    compiled rows' ratios against PEFT LoRA r=8 compiled."""
    import json
    import sys

    from benchmarks import gpu_check

    out = tmp_path / "check.json"
    argv = ["gpu_check", "--tiny", "--backend", "aot_eager", "--repeats", "1", "--gen-repeats", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    gpu_check.main()
    report = json.loads(out.read_text())
    assert all(check["passed"] for check in report["checks"].values())
    assert report["checks"]["forced_routing_equals_lora"]["max_abs_difference"] < 1e-4
    assert "skipped" in report["checks"]["no_host_syncs"]  # a CUDA check
    rows = {row["row"]: row for row in report["benchmark"]}
    assert set(gpu_check.DEFAULT_ROWS) | {"lora-r8"} == set(rows)
    assert all(row["train_ratio"] > 0 and row["gen_ratio"] > 0 for row in rows.values())


def test_host_sync_check_runs_its_steps_on_cpu(monkeypatch):
    """The GPU check's training and decoding steps run (here without CUDA's sync detection, which a CPU lacks): the
    code a GPU run depends on, down to transformers' cache keywords."""
    import contextlib

    from benchmarks import gpu_check

    workload = miniature(WORKLOADS["llama-1b-gpu"])
    monkeypatch.setattr(gpu_check, "_sync_debug_mode", lambda mode: contextlib.nullcontext())
    model = gpu_check._mixer(workload, workload.dtype)
    assert gpu_check._host_syncs(model, workload) == {"train_step": "none", "decode_step": "none"}
