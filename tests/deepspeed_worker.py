"""Two training steps of the domains mixer under DeepSpeed ZeRO (2 or 3) on CPU processes (gloo), run by
`torch.distributed.run` from test_deepspeed.

Each process takes its slice of the global batch. `--trainer` trains through `transformers.Trainer(deepspeed=...)`,
else through the raw engine of `deepspeed.initialize`. Before training, under ZeRO-3, it calls what used to fail:
`generate` before any forward through the engine, `set_trainable` with the preservation term after the engine
partitioned the parameters, and `save_pretrained` (which must refuse clearly). Rank 0 writes the losses, the
probe logits, the generated ids and the refusal's message to `--out/run.pt` and the gathered adapter to
`--out/adapter`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from domains import mixed_samples, mixer_model
from transformers import default_data_collator

import peft_lora_mixer.layer as layer_module
import peft_lora_mixer.selected_experts as selected_experts

LEARNING_RATE = 0.5
GLOBAL_BATCH = 8
STEPS = 2
PRESERVATION = float(os.environ.get("PRES", "0.5"))


def step_batches() -> list[dict[str, torch.Tensor]]:
    """The global batch of each training step."""
    samples = [{k: v for k, v in s.items() if k != "expert_id"} for s in mixed_samples(2 * STEPS, seed=4)]
    return [default_data_collator(samples[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH]) for i in range(STEPS)]


def probe_inputs() -> torch.Tensor:
    return step_batches()[0]["input_ids"][::3]


def build_model(rsl: bool, selected: bool) -> torch.nn.Module:
    """The domains mixer, experts and routers trainable (random B, so the routers get a task gradient too), the
    preservation term on; `selected`: 16 experts of rank 8, routed `topk` top-1 on the selected-experts path."""
    extra = dict(num_experts=16, routing="topk") if selected else {}
    return mixer_model(add_routing_loss=rsl, init_weights=False, rsl_preservation_weight=PRESERVATION, **extra)


def deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": LEARNING_RATE}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1 by default; the one-process reference does not clip
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,  # partition every parameter, however small
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def train_with_engine(model, stage: int, rank: int, world: int) -> dict:
    """Through the raw engine; under ZeRO-3 first `generate`, before any forward through the engine (the layer must
    gather its own parameters), and `set_trainable` after partitioning (the anchors must be the full weights)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=deepspeed_config(stage)
    )
    result = {}
    if stage == 3:
        model.eval()
        with torch.no_grad():
            result["generated"] = model.generate(
                input_ids=probe_inputs()[:1], max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        model.train()
    model.set_trainable(routers=True, experts=True)
    result["losses"] = []
    share = GLOBAL_BATCH // world
    for batch in step_batches():
        micro = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
        loss = engine(**micro).loss
        engine.backward(loss)
        engine.step()
        result["losses"].append(mean_over_processes(loss))
    return result


def train_with_trainer(model, stage: int, out: Path) -> list[float]:
    """Through `Trainer(deepspeed=...)`; with no GPU, accelerate gives DeepSpeed one process and no backend unless
    the distributed state exists first."""
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    rows = {k: torch.cat([b[k] for b in step_batches()]).tolist() for k in step_batches()[0]}
    losses = []

    class KeepLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            str(out / "trainer"),
            per_device_train_batch_size=GLOBAL_BATCH // 2,
            max_steps=STEPS,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            train_sampling_strategy="sequential",  # rank r takes rows 4r..4r+3 of each global batch, as the engine
            deepspeed=deepspeed_config(stage),
            accelerator_config={"use_configured_state": True},
        ),
        train_dataset=Dataset.from_dict(rows),
        callbacks=[KeepLosses()],
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return losses


def mean_over_processes(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
    parser.add_argument("--rsl", action="store_true")
    parser.add_argument("--selected", action="store_true")
    parser.add_argument("--trainer", action="store_true")
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    selected_calls = count_selected_expert_calls() if args.selected else []
    model = build_model(args.rsl, args.selected)
    if args.trainer:
        result = {"losses": train_with_trainer(model, args.stage, args.out)}
    else:
        result = train_with_engine(model, args.stage, rank, world)
        result.update(save_under_zero(model, args.stage, args.out, rank))
    result["selected_expert_calls"] = len(selected_calls)
    model.eval()
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=args.stage == 3):
        result["logits"] = model(input_ids=probe_inputs()).logits
    if rank == 0:
        torch.save(result, args.out / "run.pt")
    dist.barrier()


def count_selected_expert_calls() -> list[int]:
    """The selected-experts path for the tiny batch (the measured crossover wants many more tokens), counted."""
    selected_experts.MIN_TOKENS = 1
    calls, original = [], layer_module.add_selected_experts

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer_module.add_selected_experts = counted
    return calls


def save_under_zero(model, stage: int, out: Path, rank: int) -> dict:
    """ZeRO-3: a plain `save_pretrained` refuses (its tensors are shards); gathered on every process, it saves."""
    import deepspeed

    result = {}
    if stage == 3:
        try:
            model.save_pretrained(out / "refused")
        except RuntimeError as error:
            result["save_refusal"] = str(error)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        if rank == 0:
            model.save_pretrained(out / "adapter")
    return result


if __name__ == "__main__":
    main()
