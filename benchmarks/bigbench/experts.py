"""One plain PEFT LoRA per task, heterogeneous as adapters found on the Hub are, trained with the Trainer and cached.

The experts differ in rank (4 to 16), scaling, target set (attention only, attention and MLP, MLP-heavy) and one
uses rsLoRA, so every combining method meets the layouts it would meet in practice. Training is completion-only:
the loss covers the answer and the end-of-sequence token, not the prompt.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, set_seed

from ..training import fit
from .data import Example

EXPERT_WEIGHTS = "adapter_model.safetensors"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# the i-th task's expert takes the i-th layout (cycling); the rsLoRA one is not first, since PEFT's
# add_weighted_adapter copies the first adapter's `use_rslora` into the merged adapter
EXPERT_LAYOUTS: list[dict] = [
    {"r": 8, "lora_alpha": 16, "target_modules": ATTENTION},
    {"r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
    {"r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
    {"r": 6, "lora_alpha": 6, "target_modules": ["k_proj", "v_proj", "o_proj", "gate_proj"], "use_rslora": True},
    {"r": 12, "lora_alpha": 24, "target_modules": [*ATTENTION, "up_proj"]},
    {"r": 8, "lora_alpha": 8, "target_modules": ["o_proj", "gate_proj", "up_proj", "down_proj"]},
]


def expert_config(index: int) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.05, **EXPERT_LAYOUTS[index % len(EXPERT_LAYOUTS)])


def encode(example: Example, tokenizer, max_length: int, expert_id: int | None = None) -> dict:
    """Prompt, a space, the answer and EOS as token ids; only the answer and EOS are labels."""
    prompt = tokenizer(example.prompt)["input_ids"]
    answer = tokenizer(" " + example.target)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    sample = {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}
    return sample if expert_id is None else {**sample, "expert_id": expert_id}


def collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest sample (labels with -100)."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def mixed(examples: dict[str, list[Example]], tokenizer, max_length: int, count: int | None, seed: int) -> list[dict]:
    """`count` examples (None: all) drawn evenly over the tasks in a seeded order, each with its task's index as
    `expert_id`, shuffled together."""
    rng = random.Random(seed)
    per_task = None if count is None else -(-count // len(examples))
    samples = [
        encode(example, tokenizer, max_length, index)
        for index, task_examples in enumerate(examples.values())
        for example in rng.sample(task_examples, len(task_examples))[:per_task]
    ]
    rng.shuffle(samples)
    return samples if count is None else samples[:count]


def train(model, samples: list[dict], steps: int, lr: float, seed: int, batch_size: int, tokenizer, **kwargs) -> None:
    """The package demo's Trainer loop, with this benchmark's padding collator unless one is given."""
    kwargs.setdefault("data_collator", collator(tokenizer))
    fit(model, samples, steps, lr, seed, batch_size=batch_size, **kwargs)


def train_expert(
    base, index: int, examples: list[Example], folder: Path, size, tokenizer, seed: int, log=print
) -> None:
    """Train the task's expert (skipped when `folder` already holds it) and save it there."""
    if (folder / EXPERT_WEIGHTS).is_file():
        return
    log(f"training expert {index} ({folder.name}): {EXPERT_LAYOUTS[index % len(EXPERT_LAYOUTS)]}")
    # LoRA's A is drawn here, before the Trainer seeds: seeded so that an expert does not depend on what the process
    # did before (which expert it trained first, in which of several runs), and a rerun makes the same bytes
    set_seed(seed + index)
    model = get_peft_model(base, expert_config(index))
    samples = [encode(example, tokenizer, size.max_length) for example in examples]
    train(model, samples, size.expert_steps, size.expert_lr, seed, size.batch_size, tokenizer)
    unfinished = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    model.save_pretrained(unfinished)
    shutil.rmtree(folder, ignore_errors=True)  # what a run that died while saving left
    unfinished.replace(folder)  # whole, so that a run waiting on the weights never loads half a folder
