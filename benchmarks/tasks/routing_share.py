"""Whether trained routers send each task's tokens to its own expert: for mixers a run saved in its cache, the share
of each task's held-out tokens (prompt and answer, teacher-forced) whose top-1 expert is the task's, per third of
the model's layers (`--bands`); with `--router-examples N`, of the router examples that the rows with N per task
trained on. A score says how well a row does; this says whether its routers learned the tasks.

    python -m benchmarks.tasks.routing_share k2-rsl-random-20-s0 k2-rsl-random-labels-20-s0
    python -m benchmarks.tasks.routing_share k2-rsl-random-20-s0 --router-examples 20
"""

from __future__ import annotations

import argparse
import re

import torch
from peft import PeftModel

from benchmarks.bigbench.experts import collator, mixed
from benchmarks.bigbench.methods import Context
from benchmarks.bigbench.models import load_base, load_tokenizer
from benchmarks.bigbench.run import BENCH_CACHE, run_folder

from .generators import TASKS
from .sizes import SIZES
from .source import task_source

LAYER = re.compile(r"\.layers\.(\d+)\.")


@torch.no_grad()
def own_expert_share(model: PeftModel, batches: list[dict], bands: int = 3) -> list[list[float]]:
    """For batch t (task t's tokens), the share of its tokens whose top-1 expert is expert t, averaged over the routed
    modules of each of `bands` equal spans of the layers (early, middle, late; at most one a layer): [task][band].
    A router slot pair (router_init='arrow') counts as one expert."""
    model.eval()
    shares = []
    for expert, batch in enumerate(batches):
        with model.collect_routing_stats():
            model.routing_stats(reset=True)
            model(**batch)
            stats = model.routing_stats(reset=True)
        layers = {name: int(LAYER.search(name).group(1)) for name in stats}
        depth = max(layers.values()) + 1
        spans: list[list[float]] = [[] for _ in range(min(bands, depth))]
        for name, module in stats.items():
            usage = module.usage.reshape(len(batches), -1).sum(-1)  # slots per expert: 1, or 2 under Arrow init
            spans[layers[name] * len(spans) // depth].append(float(usage[expert]))
        shares.append([sum(span) / len(span) for span in spans])
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tasks.routing_share", description=__doc__)
    parser.add_argument("mixers", nargs="+", help="folder names under the run's mixers/ (e.g. k2-rsl-random-20-s0)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its splits)")
    parser.add_argument("--examples", type=int, default=16, help="examples per task")
    parser.add_argument("--bands", type=int, default=3, help="spans of layers to average over (the depth: per layer)")
    parser.add_argument(
        "--router-examples",
        type=int,
        default=None,
        metavar="N",
        help="read the router examples a row with N per task trained on, not held-out ones",
    )
    args = parser.parse_args(argv)
    tasks, source = list(TASKS), task_source({})
    folder = run_folder(args.size, tasks, source)
    missing = [name for name in args.mixers if not (folder / "mixers" / name / "adapter_config.json").is_file()]
    if missing:
        parser.error(f"no saved mixer {', '.join(missing)} in {folder / 'mixers'}; run its row first")
    splits = source.splits(tasks, args.size, args.seed)
    base_dir = BENCH_CACHE / f"base-{SIZES[args.size].model}"
    tokenizer = load_tokenizer(base_dir)
    pad = collator(tokenizer)
    max_length = SIZES[args.size].max_length
    if args.router_examples:  # the rows' own draw
        ctx = Context(base_dir, [], tokenizer, SIZES[args.size], splits, folder)
        drawn = ctx.samples("router", args.router_examples, args.seed)
        by_task = [[sample for sample in drawn if sample["expert_id"] == t][: args.examples] for t in range(len(tasks))]
    else:
        by_task = [mixed({task: splits[task]["heldout"]}, tokenizer, max_length, args.examples, 0) for task in tasks]
    batches = [
        pad([{k: v for k, v in sample.items() if k != "expert_id"} for sample in samples]) for samples in by_task
    ]
    spans = "early, middle, late layers" if args.bands == 3 else f"{args.bands} spans of layers, first to last"
    print(f"| mixer | task | share whose top-1 is the task's expert: {spans} |\n|---|---|---|")
    for name in args.mixers:
        model = PeftModel.from_pretrained(load_base(base_dir), folder / "mixers" / name)
        for task, bands in zip(tasks, own_expert_share(model, batches, args.bands)):
            print(f"| {name} | `{task}` | " + " ".join(f"{share:.2f}" for share in bands) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
