"""The demo: a miniature of the paper, offline, from a base model pretrained on the spot to routed experts.

Steps: pretrain a tiny Llama on a copy task; train one PEFT LoRA per task domain (the "existing adapters");
then compare, by held-out exact-match accuracy per domain, the base model, each expert alone, PEFT's uniform
merge of the experts, one multi-task LoRA of about the same size, PEFT's X-LoRA over the experts, LoRA-Mixer
plug-and-play over the frozen experts (routers only) with and without the Routing Specialization Loss, and
LoRA-Mixer trained jointly (stage 1: experts with forced routing; stage 2: routers with RSL).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, XLoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ...config import LoraMixerConfig
from ...experts.plug_and_play import from_experts
from ...routing_loss.stats import ModuleRoutingStats
from ...integrations.trainer import ExpertIdsCollator
from .tasks import DOMAINS, PRETRAIN, training_samples
from .train_eval import exact_match, fit, tiny_base_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RSL_WEIGHTS = dict(rsl_balance_weight=0.1, rsl_entropy_weight=0.1)


@dataclass(frozen=True)
class DemoSize:
    """How big and how long: `full` is the documented run, `smoke` a seconds-long check of the whole pipeline."""

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


SIZES = {"full": DemoSize(), "smoke": DemoSize(pretrain_steps=20, expert_steps=10, router_steps=5, eval_count=8)}


def mixed_samples(size: DemoSize, seed: int, steps: int) -> list[dict]:
    """Samples of every domain, `expert_id` = the domain's index, enough for `steps` batches."""
    per_domain = steps * size.batch_size // len(DOMAINS) + 1
    return [s for i, d in enumerate(DOMAINS) for s in training_samples(d, i, per_domain, seed + i)]


def evaluate(model: torch.nn.Module, size: DemoSize, seed: int) -> dict[str, float]:
    return {domain.name: exact_match(model, domain, size.eval_count, seed + 1000) for domain in DOMAINS}


@torch.no_grad()
def routing_by_domain(model: PeftModel, size: DemoSize, seed: int) -> dict[str, dict[str, ModuleRoutingStats]]:
    """Per-module routing statistics over held-out samples (prompt and answer) of each domain."""
    model.eval()
    stats = {}
    for index, domain in enumerate(DOMAINS):
        samples = training_samples(domain, index, size.eval_count, seed + 1000)
        with model.collect_routing_stats():
            model(input_ids=torch.tensor([s["input_ids"] for s in samples]))
        stats[domain.name] = model.routing_stats(reset=True)
    return stats


def routing_accuracy(stats: dict[str, dict[str, ModuleRoutingStats]]) -> dict[str, float]:
    """Per domain: the fraction of tokens whose top-k holds that domain's own expert, averaged over the modules."""
    return {
        domain.name: sum(s.top_k_usage[index].item() for s in stats[domain.name].values()) / len(stats[domain.name])
        for index, domain in enumerate(DOMAINS)
    }


class Demo:
    """Runs the steps in order, keeping the pretrained base and the experts on disk under `output_dir`."""

    def __init__(self, output_dir: Path, size: DemoSize, seed: int, log: Callable[[str], None] = print) -> None:
        self.output_dir, self.size, self.seed, self.log = output_dir, size, seed, log
        self.base_dir = output_dir / "base"
        self.expert_dirs = [output_dir / "experts" / domain.name for domain in DOMAINS]

    def base(self) -> AutoModelForCausalLM:
        return AutoModelForCausalLM.from_pretrained(self.base_dir)

    def train(self, model, samples, steps, lr: float | None = None, **kwargs) -> None:
        fit(model, samples, steps, lr or self.size.lr, self.seed, batch_size=self.size.batch_size, **kwargs)

    def pretrain(self) -> None:
        model = tiny_base_model(self.size.hidden_size, self.size.layers, self.seed)
        samples = training_samples(PRETRAIN, 0, self.size.pretrain_steps * self.size.batch_size, self.seed)
        self.log(f"pretraining the base model on {PRETRAIN.name!r}")
        self.train(model, samples, self.size.pretrain_steps)
        model.save_pretrained(self.base_dir)

    def train_experts(self) -> None:
        for index, (domain, folder) in enumerate(zip(DOMAINS, self.expert_dirs)):
            self.log(f"training the {domain.name!r} expert (a plain PEFT LoRA)")
            model = get_peft_model(self.base(), self.lora_config(self.size.rank))
            samples = training_samples(domain, index, self.size.expert_steps * self.size.batch_size, self.seed + 7)
            self.train(model, samples, self.size.expert_steps)
            model.save_pretrained(folder)

    def lora_config(self, rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")

    def expert_alone(self, index: int) -> PeftModel:
        return PeftModel.from_pretrained(self.base(), self.expert_dirs[index])

    def uniform_merge(self) -> PeftModel:
        model = PeftModel.from_pretrained(self.base(), self.expert_dirs[0], adapter_name=DOMAINS[0].name)
        for domain, folder in zip(DOMAINS[1:], self.expert_dirs[1:]):
            model.load_adapter(folder, adapter_name=domain.name)
        names = [d.name for d in DOMAINS]
        model.add_weighted_adapter(names, [1 / len(names)] * len(names), "uniform", combination_type="cat")
        model.set_adapter("uniform")
        return model

    def multitask_lora(self) -> PeftModel:
        """One LoRA of rank E*r (the experts' total size) trained on all domains for their total steps."""
        model = get_peft_model(self.base(), self.lora_config(self.size.rank * len(DOMAINS)))
        steps = self.size.expert_steps * len(DOMAINS)
        self.train(model, mixed_samples(self.size, self.seed + 11, steps), steps)
        return model

    def xlora(self) -> PeftModel:
        base = self.base()
        base.config.use_cache = False  # X-LoRA's requirement
        # X-LoRA names its adapters "0", "1", ... internally; other names break its adapter switching
        config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=self.size.hidden_size, xlora_depth=1,
                             adapters={str(i): str(f) for i, f in enumerate(self.expert_dirs)})
        model = get_peft_model(base, config)
        samples = mixed_samples(self.size, self.seed + 13, self.size.router_steps)
        self.train(model, samples, self.size.router_steps, lr=self.size.router_lr)
        return model

    def plug_and_play(self, rsl: bool) -> PeftModel:
        weights = RSL_WEIGHTS if rsl else dict(add_routing_loss=False)
        model = from_experts(self.base(), [str(f) for f in self.expert_dirs], top_k=self.size.top_k, **weights)
        samples = mixed_samples(self.size, self.seed + 17, self.size.router_steps)
        self.train(model, samples, self.size.router_steps, lr=self.size.router_lr)
        return model

    def joint(self) -> PeftModel:
        config = LoraMixerConfig(num_experts=len(DOMAINS), top_k=self.size.top_k, r=self.size.rank,
                                 lora_alpha=2 * self.size.rank, target_modules=TARGETS, **RSL_WEIGHTS)
        model = get_peft_model(self.base(), config)
        steps = self.size.expert_steps * len(DOMAINS)
        model.set_trainable(routers=False, experts=True)
        self.train(model, mixed_samples(self.size, self.seed + 19, steps), steps, keep_columns=True,
                   data_collator=ExpertIdsCollator())
        model.set_trainable(routers=True, experts=False)
        samples = mixed_samples(self.size, self.seed + 23, self.size.router_steps)
        self.train(model, samples, self.size.router_steps, lr=self.size.router_lr)
        return model


def run_demo(output_dir: Path, size: DemoSize = DemoSize(), seed: int = 0) -> dict:
    """Run every step, print the table, write `results.json`; return the results."""
    torch.manual_seed(seed)
    # The demo's matrices are tiny: on CPU, thread hand-offs cost more than they save (8x faster with one thread
    # on a 2-core machine), and one thread also makes the run reproducible.
    torch.set_num_threads(1)
    output_dir.mkdir(parents=True, exist_ok=True)
    demo, started = Demo(output_dir, size, seed), time.perf_counter()
    demo.pretrain()
    demo.train_experts()
    rows: dict[str, dict[str, float]] = {"base model": evaluate(demo.base(), size, seed)}
    for index, domain in enumerate(DOMAINS):
        rows[f"expert {domain.name} alone"] = evaluate(demo.expert_alone(index), size, seed)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "uniform merge (add_weighted_adapter)": demo.uniform_merge,
        "multi-task LoRA (same size)": demo.multitask_lora,
        "X-LoRA over the experts": demo.xlora,
        "LoRA-Mixer plug-and-play, no RSL": lambda: demo.plug_and_play(rsl=False),
        "LoRA-Mixer plug-and-play, RSL": lambda: demo.plug_and_play(rsl=True),
        "LoRA-Mixer joint (2 stages, RSL)": demo.joint,
    }
    routing: dict[str, dict[str, float]] = {}
    plot = None
    for name, build in builders.items():
        demo.log(f"building and training: {name}")
        model = build()
        rows[name] = evaluate(model, size, seed)
        if name.startswith("LoRA-Mixer plug-and-play"):
            stats = routing_by_domain(model, size, seed)
            routing[name] = routing_accuracy(stats)
            if name.endswith("RSL") and not name.endswith("no RSL"):
                plot = draw_heatmap(stats, output_dir / "routing_heatmap.png")
    oracle = {d.name: rows[f"expert {d.name} alone"][d.name] for d in DOMAINS}
    results = {"size": asdict(size), "seed": seed, "domains": [d.name for d in DOMAINS], "accuracy": rows,
               "oracle": oracle, "routing_accuracy": routing, "plot": plot,
               "seconds": round(time.perf_counter() - started, 1)}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(rows, oracle))
    print("\nrouting accuracy (tokens whose top-k holds their domain's expert, mean over projections):")
    print(format_table(routing, {d.name: 1.0 for d in DOMAINS}, oracle_row=False))
    return results


def draw_heatmap(stats: dict[str, dict[str, ModuleRoutingStats]], path: Path) -> str | None:
    """The usage heatmap, or None when matplotlib (the `plot` extra) is not installed."""
    try:
        from ..plot import plot_usage_heatmap

        return str(plot_usage_heatmap(stats, path))
    except ImportError:
        return None


def format_table(rows: dict[str, dict[str, float]], oracle: dict[str, float], oracle_row: bool = True) -> str:
    """Accuracy per domain, their mean, and the mean as a fraction of the oracle's (right expert alone)."""
    names = list(oracle)
    oracle_mean = sum(oracle.values()) / len(oracle)
    extra = [("oracle (right expert alone)", oracle)] if oracle_row else []
    width = max(len(r) for r, _ in [*rows.items(), *extra]) + 2
    lines = [f"{'':<{width}}" + "".join(f"{n:>9}" for n in names) + f"{'mean':>9}{'/oracle':>9}"]
    for row, accuracy in [*rows.items(), *extra]:
        mean = sum(accuracy.values()) / len(accuracy)
        cells = "".join(f"{accuracy[n]:>9.3f}" for n in names)
        lines.append(f"{row:<{width}}{cells}{mean:>9.3f}{mean / max(oracle_mean, 1e-9):>9.2f}")
    return "\n".join(lines)
