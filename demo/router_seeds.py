"""`python -m demo.router_seeds`: the tiny demo's plug-and-play rows over seeds and router variants, to see how
often training the routers stalls (a domain left on the wrong experts) and whether a variant changes that.

Each seed gets its own base model and experts (as `python -m demo --seed N` makes them, cached under the output
folder), then every (row, variant) trains its routers and is scored as the demo scores it: mean exact match over
the domains as a share of the oracle's. What it found is in docs/plug_and_play.md#when-router-training-stalls.

    python -m demo.router_seeds --seeds 0 1 2 3 4                     # the default routers, every row
    python -m demo.router_seeds --seeds 2 --variants default zero-init arrow-init temperature-0.5 topk
    python -m demo.router_seeds --variants labels labels-top-1     # routers taught each sample's domain
    python -m demo.router_seeds --variants best-expert-labels       # ... or the expert that fits it best
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from benchmarks.mixers import plug_and_play, with_best_expert_labels
from benchmarks.tables import markdown_table
from peft_lora_mixer import ExpertIdsCollator

from .run import SIZES, Demo, DemoSize, oracle_share, plug_and_play_rows
from .tiny import TinyWorkload


@dataclass(frozen=True)
class RouterVariant:
    """A change to the demo's router training: config fields, `top_k` (None: the demo's), the learning rate's
    factor, the steps' factor, where the routers start: `router_init` (None: the row's) or zero weights (every
    logit equal: no random preference at step 0), the share of the steps trained `soft` (the exact gradient of a
    dense mixture) before the config's routing takes over, and the router labels taught (`router_label_weight`):
    each sample's `domain`, or its `best-expert` (`best_expert_labels`, for data without task labels); the routers
    are scored with the config's routing."""

    config: dict[str, Any] = field(default_factory=dict)
    top_k: Optional[int] = None
    lr_factor: float = 1.0
    steps_factor: float = 1.0
    router_init: Optional[str] = None
    zero_init: bool = False
    soft_share: float = 0.0
    labels: Optional[str] = None

    @property
    def replaces_init(self) -> bool:
        """Whether the variant sets the routers' start itself, so only the rows of random routers run."""
        return self.zero_init or self.router_init is not None


VARIANTS = {
    "default": RouterVariant(),
    "zero-init": RouterVariant(zero_init=True),
    "arrow-init": RouterVariant(router_init="arrow"),
    "temperature-0.5": RouterVariant({"router_temperature": 0.5}),
    "temperature-2": RouterVariant({"router_temperature": 2.0}),
    "topk": RouterVariant({"routing": "topk"}),
    "top-1": RouterVariant(top_k=1),
    "lr-x3": RouterVariant(lr_factor=3.0),
    "lr-x0.1": RouterVariant(lr_factor=0.1),
    "steps-x3": RouterVariant(steps_factor=3.0),
    "soft-warmup": RouterVariant(soft_share=0.2),
    "soft": RouterVariant(soft_share=1.0),
    "labels": RouterVariant(labels="domain"),
    "labels-top-1": RouterVariant(top_k=1, labels="domain"),
    "labels-weight-1": RouterVariant({"router_label_weight": 1.0}, labels="domain"),
    "labels-weight-1-top-1": RouterVariant({"router_label_weight": 1.0}, top_k=1, labels="domain"),
    "best-expert-labels": RouterVariant(labels="best-expert"),
    "best-expert-labels-top-1": RouterVariant(top_k=1, labels="best-expert"),
}


class SoftUntil(TrainerCallback):
    """Routes `soft` for the first `steps` optimizer steps, then as `routing` (`set_routing` keeps the weights)."""

    def __init__(self, steps: int, routing: str) -> None:
        self.steps, self.routing = steps, routing

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.set_routing("soft")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.steps:
            model.set_routing(self.routing)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.set_routing(self.routing)


def train_row(demo: Demo, rsl: bool, router_init: str, variant: RouterVariant) -> torch.nn.Module:
    """The demo's plug-and-play row with `variant` applied."""
    size = demo.size
    top_k = variant.top_k or size.top_k
    router_init = variant.router_init or router_init
    model = plug_and_play(demo.base(), demo.expert_dirs, top_k, rsl, router_init, **variant.config)
    if variant.zero_init:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "loramixer_router" in name:
                    parameter.zero_()
    steps = round(size.router_steps * variant.steps_factor)
    soft = [SoftUntil(round(steps * variant.soft_share), model.peft_config[model.active_adapter].routing)]
    samples = demo.mixed_samples(demo.seed + 17, steps)
    if variant.labels == "best-expert":  # each sample's `expert_id` (its router label) becomes its best expert's
        samples, kept = with_best_expert_labels(model, samples, batch_size=256)
        print(f"best-expert labels equal the domain on {kept} of {len(samples)} samples")
    labels = dict(keep_columns=True, data_collator=ExpertIdsCollator(key="router_labels"))
    demo.train(
        model,
        samples,
        steps,
        lr=size.router_lr * variant.lr_factor,
        callbacks=soft if variant.soft_share else (),
        **(labels if variant.labels else {}),
    )
    return model


def run(output_dir: Path, size: DemoSize, seeds: list[int], variants: list[str]) -> dict:
    """{variant: {row: {seed: oracle share}}}, written to `output_dir / results.json` after every row."""
    torch.set_num_threads(1)  # as the demo: tiny matrices, reproducible
    results: dict[str, dict[str, dict[str, float]]] = {}
    path = output_dir / "results.json"
    for seed in seeds:
        folder = output_dir / f"seed-{seed}"
        workload = TinyWorkload(folder / "base", size, seed, log=lambda message: None)
        demo = Demo(workload, folder, size, seed)
        if not all((expert / "adapter_model.safetensors").is_file() for expert in demo.expert_dirs):
            torch.manual_seed(seed)
            workload.prepare()
            demo.train_experts()
        oracle = {d: workload.evaluate(demo.expert_alone(i))[d] for i, d in enumerate(workload.domains)}
        base = workload.evaluate(demo.base())
        for variant in variants:
            for row, (rsl, router_init) in plug_and_play_rows().items():
                if VARIANTS[variant].replaces_init and router_init != "random":
                    continue  # the variant's start replaces the row's: the other rows would repeat these
                torch.manual_seed(seed)
                model = train_row(demo, rsl, router_init, VARIANTS[variant])
                share = oracle_share(workload.evaluate(model), oracle, base, higher_is_better=True)
                results.setdefault(variant, {}).setdefault(row, {})[str(seed)] = round(share, 4)
                path.write_text(json.dumps({"size": vars(size), "seeds": seeds, "shares": results}, indent=1))
    return results


def table(results: dict) -> str:
    """One line per (variant, row): the oracle share of each seed, the worst and the mean."""
    lines = []
    for variant, rows in results.items():
        for row, shares in rows.items():
            values = list(shares.values())
            cells = [f"{value:.2f}" for value in values]
            lines.append([variant, row, " / ".join(cells), f"{min(values):.2f}", f"{sum(values) / len(values):.2f}"])
    return markdown_table(["variant", "row", "share of the oracle, per seed", "worst", "mean"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.router_seeds", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["default"])
    parser.add_argument("--size", choices=("full", "smoke"), default="full")
    parser.add_argument("--output", type=Path, default=Path("outputs/router-seeds"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    print(table(run(args.output, SIZES["tiny"][args.size], args.seeds, args.variants)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
