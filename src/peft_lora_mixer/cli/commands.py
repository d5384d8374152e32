"""The `lora-mixer` command: building, training, evaluating, inspecting and exporting mixers over existing LoRAs.

(The demo is an experiment harness beside the package: `python -m demo` from the repository's root.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..routing import ROUTING_MODES
from .export import export_command

DTYPES = ("float32", "bfloat16", "float16", "auto")


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError, OSError, ImportError) as error:
        print(f"lora-mixer {args.command}: error: {error}", file=sys.stderr)
        return 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after every option's help, except where there is no default to show (a required
    option, or one whose absence the help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lora-mixer", description=__doc__, formatter_class=HelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    build = command("build", "mix existing LoRA adapters (Hub ids or folders) into a new mixer")
    add_base_argument(build)
    build.add_argument("--experts", nargs="+", required=True, help="sources: org/name[@revision] or folders")
    build.add_argument("--output", type=Path, required=True, help="folder to save the mixer in")
    build.add_argument("--top-k", type=positive_int, default=2, help="experts each router keeps per token")
    build.add_argument(
        "--routing",
        choices=ROUTING_MODES,
        default="hard_soft",
        help="how gates follow from router logits (see LoraMixerConfig.routing)",
    )
    build.set_defaults(handler=build_command)

    train = command("train-router", "train a mixer's routers on a JSONL dataset with Trainer")
    add_base_argument(train)
    train.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    train.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSONL file: a 'text' field per line (encoder-decoder bases: 'text' and 'target')",
    )
    train.add_argument("--output", type=Path, required=True, help="folder to save the trained mixer in")
    train.add_argument(
        "--steps",
        type=positive_int,
        default=200,
        help="optimizer steps, each over --batch-size examples; the plan is printed before the first one (on a "
        "CPU, time a few steps first: a full-size model takes seconds per step)",
    )
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate of the routers")
    train.add_argument("--batch-size", type=positive_int, default=8, help="examples per step")
    train.add_argument("--max-length", type=positive_int, default=256, help="tokens kept per example")
    labels = train.add_mutually_exclusive_group()
    labels.add_argument(
        "--label-field",
        metavar="FIELD",
        help="JSONL field holding each line's expert index (0-based, in the mixer's expert order; null: no label): "
        "the routers are also taught that expert (router label loss, the mixer's `router_label_weight`)",
    )
    labels.add_argument(
        "--best-expert-labels",
        action=argparse.BooleanOptionalAction,
        help="label each line with the expert whose forced routing gives it the lowest loss (one forward per expert "
        "and line, before training), and teach the routers those labels; on by default unless --label-field is "
        "given or the mixer's `router_label_weight` is 0 (routers trained from the task loss alone can stall on "
        "wrong experts, most on few examples: docs/plug_and_play.md)",
    )
    train.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the trained mixer to this repo")
    train.set_defaults(handler=train_router_command)

    inspect = command("inspect", "show which experts each token chose: its expert mix over the adapted projections")
    add_base_argument(inspect)
    inspect.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    inspect.add_argument("--text", required=True, help="the text whose routing to show")
    inspect.add_argument(
        "--layers", type=int, nargs="+", metavar="N", help="count only the projections of these layers (default: all)"
    )
    inspect.add_argument(
        "--per-module",
        action="store_true",
        help="one column per adapted projection (its top-1 expert) instead of the expert mix",
    )
    inspect.add_argument("--heatmap", type=Path, metavar="PNG", help="also draw the expert mix per token to a PNG")
    inspect.set_defaults(handler=inspect_command)

    evaluate = command("eval", "score a mixer with lm-evaluation-harness, routing beside the scores")
    add_base_argument(evaluate)
    evaluate.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    evaluate.add_argument("--tasks", nargs="+", required=True, help="lm-eval task or group names")
    evaluate.add_argument("--include-path", type=Path, help="folder of your own lm-eval task YAML files")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    evaluate.add_argument(
        "--limit", type=float, help="documents per task (below 1: a fraction), for quick runs (default: all)"
    )
    evaluate.add_argument(
        "--batch-size", type=positive_int, default=1, help="above 1 the routing counts include padding"
    )
    evaluate.add_argument("--device", help="default: cuda if available, else cpu")
    evaluate.add_argument("--output", type=Path, help="also write the results as JSON here")
    evaluate.set_defaults(handler=eval_command)

    export = command("export", "write a mixer as a folder to serve, or as one plain PEFT LoRA")
    form = export.add_mutually_exclusive_group(required=True)
    form.add_argument(
        "--serving", action="store_true", help="one folder with the base model, its tokenizer and the mixer"
    )
    form.add_argument(
        "--static", action="store_true", help="one plain LoRA, each router fixed to its mean gates over --data"
    )
    add_base_argument(export)
    export.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    export.add_argument("--output", type=Path, required=True, help="a new or empty folder")
    export.add_argument("--data", type=Path, help="--static: JSONL calibration text, a 'text' field per line")
    export.add_argument("--group-field", help="--static: one LoRA per value of this field, into OUTPUT/<value>")
    export.add_argument("--max-length", type=positive_int, default=256, help="tokens kept per calibration text")
    export.set_defaults(handler=export_command)
    return root


def add_base_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--base",
        required=True,
        help="base model: Hub id, folder (with its tokenizer), or a .gguf file (read dequantised, with the "
        "tokenizer it carries)",
    )
    command.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype the base model is loaded in ('auto': the checkpoint's)",
    )


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def build_command(args: argparse.Namespace) -> int:
    from ..base_model import load_base_model
    from ..experts.plug_and_play import from_experts

    model = from_experts(load_base_model(args.base, args.dtype), args.experts, top_k=args.top_k, routing=args.routing)
    model.save_pretrained(args.output)
    print(f"mixer over {len(args.experts)} experts saved to {args.output}")
    return 0


def train_router_command(args: argparse.Namespace) -> int:
    import tempfile
    from collections import Counter

    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    from ..base_model import is_encoder_decoder, load_base_model, load_tokenizer
    from ..experts.best_expert import best_expert_labels
    from ..integrations.trainer import ExpertIdsCollator, RoutingCallback
    from .data import (
        ROUTER_LABEL,
        check_router_labels,
        read_records,
        tokenize_records,
        training_collator,
        training_plan,
    )

    encoder_decoder = is_encoder_decoder(args.base)
    records = read_records(args.data, ("text", "target") if encoder_decoder else ("text",), args.label_field)
    tokenizer = load_tokenizer(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # harmless: the collator masks padding by position, not by id
    samples = tokenize_records(records, tokenizer, args.max_length, encoder_decoder, args.data)
    model = PeftModel.from_pretrained(load_base_model(args.base, args.dtype), args.mixer, is_trainable=True)
    model.set_trainable(routers=True, experts=False)
    config = model.peft_config[model.active_adapter]
    if (args.label_field or args.best_expert_labels) and not config.router_label_weight:
        flag = "--label-field" if args.label_field else "--best-expert-labels"
        raise ValueError(
            f"{flag} was given, but the mixer's `router_label_weight` is 0; set it in {args.mixer}'s "
            "adapter_config.json (2 is the default) or leave the labels out."
        )
    if args.label_field:
        check_router_labels(records, config.num_distinct_experts, args.data)
    best_expert = args.best_expert_labels
    if best_expert is None:  # not given: on wherever the routers can learn from labels and none were given
        best_expert = not args.label_field and bool(config.router_label_weight)
    collator = training_collator(tokenizer, model if encoder_decoder else None)
    if best_expert:
        found = best_expert_labels(model, samples, collator, args.batch_size)
        samples = [{**sample, ROUTER_LABEL: None if label < 0 else label} for sample, label in zip(samples, found)]
        counts = ", ".join(
            f"{'no label' if expert < 0 else expert}: {count}" for expert, count in sorted(Counter(found).items())
        )
        default = " (the default; --no-best-expert-labels trains without)" if args.best_expert_labels is None else ""
        print(f"best-expert labels, lines per expert: {counts}{default}", flush=True)
    routers = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    plan = training_plan(samples, args.steps, args.batch_size, args.max_length)
    print(f"training {routers:,} router parameters on {plan}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants a folder; nothing of it is kept
        training_args = TrainingArguments(
            output_dir=scratch,
            max_steps=args.steps,
            learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size,
            save_strategy="no",
            report_to=[],
            logging_steps=10,
            remove_unused_columns=False,
        )
        if args.label_field or best_expert:
            collator = ExpertIdsCollator(collator, column=ROUTER_LABEL, key="router_labels")
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=samples,
            callbacks=[RoutingCallback()],
            data_collator=collator,
        )
        trainer.train()
    model.save_pretrained(args.output)
    print(f"trained mixer saved to {args.output}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel

    from ..base_model import load_base_model, load_tokenizer
    from ..inspection import (
        NO_CHANGE,
        expert_mix,
        expert_names,
        format_choices,
        format_expert_mix,
        recorded_gates,
        token_texts,
        within_layers,
    )

    if not args.text.strip():
        raise ValueError("--text is empty; give the text whose routing to show.")
    tokenizer = load_tokenizer(args.base)
    encoded = tokenizer(args.text, return_tensors="pt")
    if encoded["input_ids"].shape[-1] == 0:
        raise ValueError(f"--text {args.text!r} gives no tokens with this tokenizer.")
    model = PeftModel.from_pretrained(load_base_model(args.base, args.dtype), args.mixer).eval()
    inputs = dict(encoded)
    if model.config.is_encoder_decoder:  # the decoder reads the text too, one position behind (as in training)
        inputs["labels"] = encoded["input_ids"]
    with torch.no_grad(), recorded_gates(model) as (recorded, present):
        model(**inputs)
    gates = within_layers({name: forwards[0].gates for name, forwards in recorded.items()}, args.layers)
    tokens = token_texts(tokenizer, encoded["input_ids"][0].tolist())
    names = expert_names(model.peft_config["default"])
    mix = expert_mix(gates, present)
    if args.per_module:
        print(format_choices(tokens, gates, present, names))
    else:
        print(format_expert_mix(tokens, mix, names, len(gates)))
    if args.heatmap:
        from ..plot import plot_token_mix

        print(f"heatmap: {plot_token_mix(tokens, mix, [*names, NO_CHANGE], args.heatmap)}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    from peft import PeftModel

    from ..base_model import load_base_model, load_tokenizer
    from ..inspection import expert_names
    from ..integrations.lm_evaluation import evaluate_mixer, format_report, require_lm_eval, task_manager

    require_lm_eval()
    manager = task_manager(args.tasks, args.include_path)  # unknown tasks fail here, before any model is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.base)
    model = PeftModel.from_pretrained(load_base_model(args.base, args.dtype), args.mixer).to(device)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_mixer(
        model,
        tokenizer,
        args.tasks,
        manager=manager,
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
    )
    print(format_report(results, expert_names(model.peft_config["default"])))
    if args.output:
        args.output.write_text(json.dumps([dataclasses.asdict(result) for result in results], indent=2))
        print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
