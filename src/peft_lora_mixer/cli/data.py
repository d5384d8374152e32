"""Training data for `train-router`: JSONL records, checked line by line, tokenized for causal or seq2seq models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROUTER_LABEL = "router_label"  # a sample's expert index under `--label-field`, moved to `router_labels` by the collator


def read_records(
    path: Path, fields: tuple[str, ...] = ("text",), label_field: Optional[str] = None
) -> list[tuple[int, dict[str, Any]]]:
    """`(line number, {field: value})` for every non-blank line of a JSONL file; every field a non-empty string.
    With `label_field`, each record also holds `router_label`: that field's expert index (an integer >= 0), or
    -100 where it is null.

    Errors name the file and the line (also for bytes that are not UTF-8), before anything is loaded or written.
    """
    records = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}:{number} is not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                "save the file as UTF-8."
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
        for field in fields:
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise ValueError(f"{path}:{number} has no string field {field!r}.")
            if not value.strip():
                raise ValueError(f"{path}:{number} has an empty {field!r}; remove the line or give it text.")
        kept = {field: record[field] for field in fields}
        if label_field is not None:
            kept[ROUTER_LABEL] = _router_label(record, label_field, path, number)
        records.append((number, kept))
    if not records:
        raise ValueError(f"{path} holds no samples.")
    return records


def _router_label(record: dict[str, Any], field: str, path: Path, number: int) -> int:
    if field not in record:
        raise ValueError(f"{path}:{number} has no {field!r} field (the --label-field); give null for no label.")
    value = record[field]
    if value is None:
        return IGNORE_INDEX
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{path}:{number} has {field!r} = {value!r}; it must be an expert's index (0, 1, ... in the mixer's "
            "expert order) or null."
        )
    return value


def check_router_labels(records: list[tuple[int, dict[str, Any]]], num_experts: int, path: Path) -> None:
    """Refuse a label that is not one of the mixer's `num_experts` experts, naming its line."""
    for number, record in records:
        if record[ROUTER_LABEL] >= num_experts:
            raise ValueError(
                f"{path}:{number} labels expert {record[ROUTER_LABEL]}, but the mixer has {num_experts} experts "
                f"(indices 0 to {num_experts - 1})."
            )


def tokenize_records(
    records: list[tuple[int, dict[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    encoder_decoder: bool,
    path: Path,
) -> list[dict[str, Any]]:
    """Token ids and labels per record: a causal LM learns every token of 'text' (end-of-sequence tokens included:
    padding is told apart by the collator, not by the token id); an encoder-decoder reads 'text' and learns
    'target'."""
    samples = []
    for number, record in records:
        if encoder_decoder:
            sample = tokenizer(record["text"], text_target=record["target"], truncation=True, max_length=max_length)
        else:
            sample = tokenizer(record["text"], truncation=True, max_length=max_length)
            sample["labels"] = list(sample["input_ids"])
        if not sample["input_ids"] or not sample["labels"]:
            raise ValueError(f"{path}:{number} gives no tokens with this tokenizer.")
        if ROUTER_LABEL in record:
            sample[ROUTER_LABEL] = record[ROUTER_LABEL]
        samples.append(dict(sample))
    return samples


def training_collator(tokenizer: PreTrainedTokenizerBase, model=None) -> DataCollatorForSeq2Seq:
    """Pads `input_ids` with the pad token and `labels` with -100, so only padding is left out of the loss (a
    tokenizer whose pad token is its end-of-sequence token keeps its real end-of-sequence labels). With an
    encoder-decoder `model`, it also builds the decoder inputs from the labels."""
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, padding=True)


def training_plan(samples: list[dict[str, Any]], steps: int, batch_size: int, max_length: int) -> str:
    """What `train-router` is about to do, said before its first step: its length is steps x examples x tokens, and
    a default run of a real model on a CPU takes long enough that a user should know before it starts."""
    mean_tokens = sum(len(sample["input_ids"]) for sample in samples) / len(samples)
    epochs = steps * batch_size / len(samples)
    return (
        f"{len(samples)} examples of {mean_tokens:.0f} tokens on average (at most {max_length} kept); "
        f"{steps} steps of {batch_size} examples, about {batch_size * mean_tokens:.0f} tokens per step "
        f"({epochs:.1f} epochs)"
    )
