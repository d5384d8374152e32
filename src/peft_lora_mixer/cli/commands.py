"""The `lora-mixer` command: the demo, and building, training and inspecting mixers over existing LoRAs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..routing import ROUTING_MODES


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError, OSError, ImportError) as error:
        print(f"lora-mixer {args.command}: error: {error}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lora-mixer", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the offline end-to-end miniature of the paper")
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"), help="folder for results and plot")
    demo.add_argument("--size", choices=("full", "smoke"), default="full", help="'smoke': seconds, for checks")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo_command)

    build = commands.add_parser("build", help="mix existing LoRA adapters (Hub ids or folders) into a new mixer")
    add_base_argument(build)
    build.add_argument("--experts", nargs="+", required=True, help="sources: org/name[@revision] or folders")
    build.add_argument("--output", type=Path, required=True)
    build.add_argument("--top-k", type=int, default=2)
    build.add_argument("--routing", choices=ROUTING_MODES, default="hard_soft")
    build.set_defaults(handler=build_command)

    train = commands.add_parser("train-router", help="train a mixer's routers on a JSONL dataset with Trainer")
    add_base_argument(train)
    train.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    train.add_argument("--data", type=Path, required=True, help="JSONL file with a 'text' field per line")
    train.add_argument("--output", type=Path, required=True)
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the trained mixer to this repo")
    train.set_defaults(handler=train_router_command)

    inspect = commands.add_parser("inspect", help="show which expert each token chose, per adapted projection")
    add_base_argument(inspect)
    inspect.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    inspect.add_argument("--text", required=True)
    inspect.set_defaults(handler=inspect_command)

    evaluate = commands.add_parser("eval", help="score a mixer with lm-evaluation-harness, routing beside the scores")
    add_base_argument(evaluate)
    evaluate.add_argument("--mixer", required=True, help="saved mixer folder or Hub id")
    evaluate.add_argument("--tasks", nargs="+", required=True, help="lm-eval task or group names")
    evaluate.add_argument("--include-path", type=Path, help="folder of your own lm-eval task YAML files")
    evaluate.add_argument("--num-fewshot", type=int)
    evaluate.add_argument("--limit", type=float, help="documents per task (below 1: a fraction), for quick runs")
    evaluate.add_argument("--batch-size", type=int, default=1, help="above 1 the routing counts include padding")
    evaluate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    evaluate.add_argument("--output", type=Path, help="also write the results as JSON here")
    evaluate.set_defaults(handler=eval_command)
    return root


def add_base_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--base", required=True, help="base model: Hub id or folder (with its tokenizer)")


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo.run import SIZES, run_demo

    results = run_demo(args.output, SIZES[args.size], args.seed)
    print(f"results: {args.output / 'results.json'}  plot: {results['plot'] or 'skipped (pip install matplotlib)'}")
    return 0


def build_command(args: argparse.Namespace) -> int:
    from ..experts.plug_and_play import from_experts

    model = from_experts(load_base(args.base), args.experts, top_k=args.top_k, routing=args.routing)
    model.save_pretrained(args.output)
    print(f"mixer over {len(args.experts)} experts saved to {args.output}")
    return 0


def train_router_command(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from ..integrations.trainer import RoutingCallback

    texts = read_texts(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(load_base(args.base), args.mixer, is_trainable=True)
    model.set_trainable(routers=True, experts=False)
    samples = [tokenizer(text, truncation=True, max_length=args.max_length) for text in texts]
    training_args = TrainingArguments(
        output_dir=str(args.output / "checkpoints"), max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, save_strategy="no", report_to=[], logging_steps=10,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=samples, callbacks=[RoutingCallback()],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
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
    from transformers import AutoTokenizer

    from .inspection import format_choices, recorded_choices

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = PeftModel.from_pretrained(load_base(args.base), args.mixer).eval()
    encoded = tokenizer(args.text, return_tensors="pt")
    with torch.no_grad(), recorded_choices(model) as choices:
        model(**encoded)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    print(format_choices(tokens, {name: forwards[0] for name, forwards in choices.items()}))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .evaluation import evaluate_mixer, format_report, require_lm_eval, task_manager

    require_lm_eval()
    manager = task_manager(args.tasks, args.include_path)  # unknown tasks fail here, before any model is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = PeftModel.from_pretrained(load_base(args.base), args.mixer).to(device)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_mixer(model, tokenizer, args.tasks, manager=manager, num_fewshot=args.num_fewshot,
                             limit=limit, batch_size=args.batch_size)
    print(format_report(results))
    if args.output:
        args.output.write_text(json.dumps([dataclasses.asdict(result) for result in results], indent=2))
        print(f"results: {args.output}")
    return 0


def load_base(name_or_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path)


def read_texts(path: Path) -> list[str]:
    """The 'text' field of every line of a JSONL file, with the line number of any bad line."""
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number} has no string field 'text'.")
        texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path} holds no samples.")
    return texts


if __name__ == "__main__":
    raise SystemExit(main())
