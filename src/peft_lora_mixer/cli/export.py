"""`lora-mixer export`: a mixer as one folder that `transformers serve` serves, or as one plain PEFT LoRA."""

from __future__ import annotations

import argparse
from collections import defaultdict


def export_command(args: argparse.Namespace) -> int:
    return export_serving_command(args) if args.serving else export_static_command(args)


def export_serving_command(args: argparse.Namespace) -> int:
    """Base model, tokenizer and mixer in one folder."""

    from ..base_model import load_base_model, load_tokenizer
    from ..export import empty_output_dir, write_serving_folder

    for option in ("data", "group_field"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option.replace('_', '-')} is for --static; --serving reads no text.")
    empty_output_dir(args.output)  # before any model is loaded
    write_serving_folder(load_base_model(args.base, args.dtype), load_tokenizer(args.base), args.mixer, args.output)
    print(f"base model, tokenizer and mixer saved to {args.output}")
    return 0


def export_static_command(args: argparse.Namespace) -> int:
    """Calibration text from --data, one text per batch (no padding), then one export, or one per group."""
    import torch
    from peft import PeftModel

    from ..base_model import load_base_model, load_tokenizer
    from ..export import empty_output_dir, export_static_lora, export_static_lora_per_group, mixer_adapter
    from ..export_card import format_gate_table, gate_summary
    from ..inspection import expert_names
    from .data import read_records

    if args.data is None:
        raise ValueError("--static needs --data: a JSONL file of calibration text, a 'text' field per line.")
    empty_output_dir(args.output)  # before any model is loaded
    records = read_records(args.data, ("text",) if args.group_field is None else ("text", args.group_field))
    tokenizer = load_tokenizer(args.base)
    model = PeftModel.from_pretrained(load_base_model(args.base, args.dtype), args.mixer)
    groups = defaultdict(list)
    for number, record in records:
        ids = tokenizer(record["text"], truncation=True, max_length=args.max_length, return_tensors="pt")["input_ids"]
        if ids.shape[-1] == 0:
            raise ValueError(f"{args.data}:{number} gives no tokens with this tokenizer.")
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if model.config.is_encoder_decoder:  # the decoder reads the text too, one position behind
            inputs["labels"] = ids
        groups[record.get(args.group_field)].append(inputs)
    source = str(args.mixer)
    if args.group_field is None:
        gates = {None: export_static_lora(model, groups[None], args.output, source=source)}
        print(f"static LoRA saved to {args.output}, with its model card (README.md)")
    else:
        gates = export_static_lora_per_group(model, groups, args.output, source=source)
        print(f"static LoRAs of {len(groups)} groups ({', '.join(groups)}) saved to {args.output}/<group>")
    tuner, name = mixer_adapter(model, None)
    names = expert_names(tuner.peft_config[name])
    for group, group_gates in gates.items():
        print(f"\nfixed gates{'' if group is None else f' of group {group!r}'}: mean gate per expert")
        print(format_gate_table(gate_summary(tuner, name, group_gates), names))
    return 0
