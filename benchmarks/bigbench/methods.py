"""Every way of combining the experts that the benchmark compares, each returning a model ready to score.

PEFT's own methods are used as PEFT ships them (`add_weighted_adapter`, `create_arrow_model`, `XLoraConfig`),
LoRA-Mixer as a user would call it (`from_experts`, `LoraMixerConfig`), all over the same cached experts.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from peft import ArrowConfig, LoraConfig, PeftConfig, PeftModel, create_arrow_model, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from scipy.optimize import minimize

from peft_lora_mixer import LoraMixerConfig, export_static_lora, export_static_lora_per_group
from peft_lora_mixer.integrations.trainer import ExpertIdsCollator

from ..mixers import RSL_WEIGHTS, plug_and_play, with_best_expert_labels
from ..peers import xlora_over
from .data import Example
from .experts import collator, mixed, train
from .models import load_base
from .sizes import BenchSize

LORAHUB_BOUND, LORAHUB_L1 = 1.5, 0.05  # LoRAHub's weight bounds and L1 penalty
LORAHUB_STEP = 0.5  # the fit's first step on each weight


@dataclass
class Context:
    """What every method reads: the base model's folder, the experts' folders, the splits and the budgets."""

    base_dir: Path
    expert_dirs: list[Path]
    tokenizer: object
    size: BenchSize
    splits: dict[str, dict[str, list[Example]]]
    cache: Path
    log: Callable[[str], None] = print

    def base(self) -> torch.nn.Module:
        return load_base(self.base_dir)

    def samples(self, split: str, count: Optional[int], seed: int) -> list[dict]:
        """`count` examples of `split` (None: all; per task when the size says so), mixed over the tasks, each with
        its task's `expert_id`."""
        examples = {task: splits[split] for task, splits in self.splits.items()}
        if count is not None and self.size.router_examples_per_task:
            count *= len(examples)
        return mixed(examples, self.tokenizer, self.size.max_length, count, seed)

    def train(self, model, samples: list[dict], steps: int, lr: float, seed: int, **kwargs) -> None:
        train(model, samples, steps, lr, seed, self.size.batch_size, self.tokenizer, **kwargs)

    def expert_configs(self) -> list[PeftConfig]:
        return [PeftConfig.from_pretrained(folder) for folder in self.expert_dirs]

    def union_targets(self) -> list[str]:
        return sorted({name for config in self.expert_configs() for name in config.target_modules})


def expert_alone(ctx: Context, index: int) -> PeftModel:
    return PeftModel.from_pretrained(ctx.base(), ctx.expert_dirs[index])


def all_experts(ctx: Context) -> tuple[PeftModel, list[str]]:
    """One PeftModel holding every expert as a LoRA adapter named `e0`, `e1`, ..."""
    names = [f"e{i}" for i in range(len(ctx.expert_dirs))]
    model = PeftModel.from_pretrained(ctx.base(), ctx.expert_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], ctx.expert_dirs[1:]):
        model.load_adapter(folder, adapter_name=name)
    return model, names


def weighted_merge(ctx: Context, weights: list[float]) -> PeftModel:
    """PEFT's `add_weighted_adapter` with `cat`: exactly sum_e w_e s_e B_e A_e, whatever the experts' ranks."""
    model, names = all_experts(ctx)
    model.add_weighted_adapter(names, list(weights), "merged", combination_type="cat")
    model.set_adapter("merged")
    return model


def uniform_merge(ctx: Context) -> PeftModel:
    return weighted_merge(ctx, [1 / len(ctx.expert_dirs)] * len(ctx.expert_dirs))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, samples: list[dict], batch_size: int, tokenizer) -> float:
    """Mean cross-entropy per labelled token over `samples`."""
    pad = collator(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = pad([{k: v for k, v in s.items() if k != "expert_id"} for s in samples[start : start + batch_size]])
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return total / count


def weighted_sum(ctx: Context) -> tuple[PeftModel, Callable[[Sequence[float]], None]]:
    """Every expert active at once, and a setter that multiplies each expert's scalings by its weight: the `cat`
    merge of those weights, computed without merging, so that a fit can try many weights cheaply."""
    model, names = all_experts(ctx)
    model.base_model.set_adapter(names)
    layers = [module for module in model.modules() if hasattr(module, "scaling") and hasattr(module, "lora_A")]
    original = [dict(layer.scaling) for layer in layers]

    def set_weights(weights: Sequence[float]) -> None:
        for layer, scalings in zip(layers, original):
            for name, weight in zip(names, weights):
                if name in scalings:
                    layer.scaling[name] = scalings[name] * float(weight)

    return model, set_weights


def lorahub_weights(ctx: Context, count: Optional[int], seed: int) -> list[float]:
    """LoRAHub's fit: one scalar per expert, gradient-free, minimising the loss on (at most `lorahub_examples` of)
    the `count` router examples plus an L1 penalty, within [-1.5, 1.5]. COBYLA, like LoRAHub's Nevergrad, moves
    every weight from its first steps; a coordinate search (Powell) spends a 40-evaluation budget on the first two
    weights' line searches and leaves the rest at zero."""
    model, set_weights = weighted_sum(ctx)
    model.eval()
    samples = ctx.samples("router", count, seed)[: ctx.size.lorahub_examples]

    def objective(weights: np.ndarray) -> float:
        set_weights(weights)
        loss = mean_loss(model, samples, ctx.size.eval_batch_size, ctx.tokenizer)
        return loss + LORAHUB_L1 * float(np.abs(weights).sum())

    experts = len(ctx.expert_dirs)
    result = minimize(
        objective,
        np.zeros(experts),
        method="COBYLA",
        bounds=[(-LORAHUB_BOUND, LORAHUB_BOUND)] * experts,
        options={"maxiter": ctx.size.lorahub_evaluations, "rhobeg": LORAHUB_STEP},
    )
    return [float(w) for w in result.x]


def lorahub(ctx: Context, count: Optional[int], seed: int) -> PeftModel:
    weights = lorahub_weights(ctx, count, seed)
    ctx.log(f"LoRAHub weights: {[round(w, 3) for w in weights]}")
    return weighted_merge(ctx, weights)


def padded_experts(ctx: Context) -> list[Path]:
    """The experts rewritten with one rank and one target set (zero blocks where they had none, the scaling folded
    into B), which PEFT's Arrow requires; each computes exactly what the original does. Cached."""
    configs = ctx.expert_configs()
    rank, targets = max(config.r for config in configs), ctx.union_targets()
    folders = [ctx.cache / "arrow-experts" / folder.name for folder in ctx.expert_dirs]
    if all((folder / "adapter_model.safetensors").is_file() for folder in folders):
        return folders
    for config, source, folder in zip(configs, ctx.expert_dirs, folders):
        scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        model = get_peft_model(
            ctx.base(), LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, target_modules=targets)
        )
        state = {key: torch.zeros_like(value) for key, value in get_peft_model_state_dict(model).items()}
        for key, value in load_file(source / "adapter_model.safetensors").items():
            if ".lora_A." in key:
                state[key][: value.shape[0]] = value
            else:
                state[key][:, : value.shape[1]] = scale * value
        set_peft_model_state_dict(model, state)
        model.save_pretrained(folder)
    return folders


def arrow(ctx: Context, top_k: int = 2) -> PeftModel:
    """PEFT's Arrow over the (padded) experts, zero-shot: no training data at all."""
    config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    return create_arrow_model(ctx.base(), [str(f) for f in padded_experts(ctx)], config)


def xlora(ctx: Context, count: Optional[int], seed: int) -> PeftModel:
    """PEFT's X-LoRA over the experts, trained on the same router examples and steps as the LoRA-Mixer rows."""
    model = xlora_over(ctx.base(), ctx.expert_dirs)
    ctx.train(model, ctx.samples("router", count, seed), ctx.size.router_steps, ctx.size.router_lr, seed)
    return model


LABEL_SUFFIXES = {None: "", "task": "-labels", "best-expert": "-bestlabels"}  # in cache folders and row keys


def mixer(
    ctx: Context,
    top_k: int,
    rsl: bool,
    router_init: str,
    count: Optional[int],
    seed: int,
    steps: int,
    labels: Optional[str] = None,
) -> PeftModel:
    """LoRA-Mixer plug-and-play: the frozen experts, routers trained `steps` steps on `count` router examples, and
    taught router labels with `labels`: each example's `task` expert, or its `best-expert` (`best_expert_labels`, as
    for data without task labels). A trained mixer is saved as the PEFT adapter a user would save, and loaded from
    there when asked again (the static-export rows read it)."""
    name = f"k{top_k}-{'rsl' if rsl else 'norsl'}-{router_init}{LABEL_SUFFIXES[labels]}-{count or 'all'}-s{seed}"
    folder = ctx.cache / "mixers" / name
    if steps and (folder / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(ctx.base(), folder)
    torch.manual_seed(seed)
    model = plug_and_play(ctx.base(), ctx.expert_dirs, top_k, rsl, router_init)
    if steps:
        samples = ctx.samples("router", count, seed)
        if labels == "best-expert":
            samples, kept = with_best_expert_labels(model, samples, collator(ctx.tokenizer), ctx.size.eval_batch_size)
            ctx.log(f"best-expert labels: the example's own task's expert for {kept} of {len(samples)}")
        taught = dict(keep_columns=True, data_collator=ExpertIdsCollator(collator(ctx.tokenizer), key="router_labels"))
        ctx.train(model, samples, steps, ctx.size.router_lr, seed, **(taught if labels else {}))
        model.save_pretrained(folder)
    return model


def calibration_batches(ctx: Context, samples: list[dict]) -> list[dict]:
    """Router examples (prompt and answer) as padded model inputs, `eval_batch_size` at a time."""
    pad = collator(ctx.tokenizer)
    keep = ("input_ids", "attention_mask")
    return [
        pad([{key: sample[key] for key in keep} for sample in samples[start : start + ctx.size.eval_batch_size]])
        for start in range(0, len(samples), ctx.size.eval_batch_size)
    ]


def static_export(ctx: Context, per_task: bool, top_k: int, rsl: bool, seed: int) -> Union[PeftModel, dict]:
    """The trained mixer (all router examples) exported as plain PEFT LoRA with `export_static_lora`: one LoRA from
    the mean gates over every router example, or (`per_task`) one per task from its own router examples, returned
    as {task: model} so that each task is scored with its LoRA. Loaded with plain PEFT, as an engine would."""
    folder = (
        ctx.cache / "static" / f"k{top_k}-{'rsl' if rsl else 'norsl'}-all-s{seed}-{'per-task' if per_task else 'all'}"
    )
    tasks = list(ctx.splits)
    groups = {task.replace(":", "__"): task for task in tasks}
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        model = mixer(ctx, top_k, rsl, "random", None, seed, ctx.size.router_steps)
        samples = ctx.samples("router", None, seed)
        if per_task:
            by_group = {
                group: calibration_batches(ctx, [s for s in samples if tasks[s["expert_id"]] == task])
                for group, task in groups.items()
            }
            export_static_lora_per_group(model, by_group, folder)
        else:
            export_static_lora(model, calibration_batches(ctx, samples), folder)
        (folder / "done").touch()
    if per_task:
        return {task: PeftModel.from_pretrained(ctx.base(), folder / group) for group, task in groups.items()}
    return PeftModel.from_pretrained(ctx.base(), folder)


def joint(ctx: Context, seed: int) -> PeftModel:
    """The paper's joint regime on the same data: new experts (r=8 on the experts' target union) trained with
    forced routing on the expert-train examples for the experts' total steps, then routers with the RSL."""
    torch.manual_seed(seed)
    count = len(ctx.expert_dirs)
    config = LoraMixerConfig(
        num_experts=count, top_k=2, r=8, lora_alpha=16, target_modules=ctx.union_targets(), **RSL_WEIGHTS
    )
    model = get_peft_model(ctx.base(), config)
    model.set_trainable(routers=False, experts=True)
    ctx.train(
        model,
        ctx.samples("expert", None, seed),
        ctx.size.expert_steps * count,
        ctx.size.expert_lr,
        seed,
        keep_columns=True,
        data_collator=ExpertIdsCollator(collator(ctx.tokenizer)),
    )
    model.set_trainable(routers=True, experts=False)
    ctx.train(model, ctx.samples("router", None, seed), ctx.size.router_steps, ctx.size.router_lr, seed)
    return model


def multitask(ctx: Context, seed: int) -> PeftModel:
    """One LoRA of the mixer's size (rank = the experts' ranks summed, on their target union), trained on all the
    expert-train and router-train examples for the experts' total steps: the upper reference."""
    rank = sum(config.r for config in ctx.expert_configs())
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, target_modules=ctx.union_targets())
    model = get_peft_model(ctx.base(), config)
    samples = ctx.samples("expert", None, seed) + ctx.samples("router", None, seed)
    ctx.train(model, samples, ctx.size.expert_steps * len(ctx.expert_dirs), ctx.size.expert_lr, seed)
    return model
