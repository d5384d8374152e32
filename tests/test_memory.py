"""Training with the RSL keeps nothing from one step to the next: the live tensors after step 40 are those after
step 5, in a hand loop, the Trainer and TRL's SFTTrainer (before the fix, each step kept the last one's graph)."""

import gc

import torch
from mixers import rsl_mixer
from tiny_tokenizer import tiny_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_lora_mixer import RoutingCallback

STEPS, CHECKED = 40, (5, 40)


def live_tensors() -> tuple[int, int]:
    """(number, bytes) of the tensors the process holds, after a full garbage collection."""
    gc.collect()
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def assert_nothing_grew(counts: dict[int, tuple[int, int]]) -> None:
    (tensors_5, bytes_5), (tensors_40, bytes_40) = counts[5], counts[40]
    assert tensors_40 <= tensors_5 and bytes_40 <= bytes_5, counts


def token_batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(2, 128, (6, 24), generator=generator) for _ in range(steps)]


def test_hand_loop_holds_no_more_tensors_after_40_steps_than_after_5():
    model = rsl_mixer(rsl_entropy_target=0.5, rsl_preservation_weight=0.1)  # every part of the RSL on
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counts = {}
    for step, ids in enumerate(token_batches(STEPS), start=1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in CHECKED:
            counts[step] = live_tensors()
    assert model.routing_loss().total > 0
    assert_nothing_grew(counts)


class CountTensors(TrainerCallback):
    def __init__(self) -> None:
        self.counts = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in CHECKED:
            self.counts[state.global_step] = live_tensors()


def train_arguments(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=6,
        learning_rate=2e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
    )


def test_trainer_holds_no_more_tensors_after_40_steps_than_after_5(tmp_path):
    from datasets import Dataset

    ids = torch.cat(token_batches(STEPS))
    counter = CountTensors()
    trainer = Trainer(
        model=rsl_mixer(),
        args=TrainingArguments(**train_arguments(tmp_path), gradient_accumulation_steps=2),
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
        callbacks=[RoutingCallback(), counter],
    )
    trainer.train()
    assert all(log["rsl/total"] > 0 for log in trainer.state.log_history if "loss" in log)
    assert_nothing_grew(counter.counts)


def test_sft_trainer_holds_no_more_tensors_after_40_steps_than_after_5(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    counter = CountTensors()
    trainer = SFTTrainer(
        model=rsl_mixer(),
        args=SFTConfig(**train_arguments(tmp_path), bf16=False),
        train_dataset=Dataset.from_dict({"input_ids": torch.cat(token_batches(STEPS)).tolist()}),
        processing_class=tiny_tokenizer(),
        callbacks=[RoutingCallback(), counter],
    )
    trainer.train()
    assert all(log["rsl/total"] > 0 for log in trainer.state.log_history if "loss" in log)
    assert_nothing_grew(counter.counts)
