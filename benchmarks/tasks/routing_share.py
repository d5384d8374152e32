"""Whether trained routers send each task's tokens to its own expert: for mixers a run saved in its cache, the share
of each task's held-out tokens (prompt and answer, teacher-forced) whose top-1 expert is the task's, per third of
the model's layers. A score says how well a row does; this says whether its routers learned the tasks.

    python -m benchmarks.tasks.routing_share k2-rsl-random-20-s0 k2-rsl-random-labels-20-s0
"""

from __future__ import annotations

import argparse
import re

import torch
from peft import PeftModel

from benchmarks.bigbench.experts import collator, mixed
from benchmarks.bigbench.models import load_base, load_tokenizer
from benchmarks.bigbench.run import BENCH_CACHE, run_folder

from .generators import TASKS
from .sizes import SIZES
from .source import task_source

LAYER = re.compile(r"\.layers\.(\d+)\.")
BANDS = 3  # early, middle and late layers


@torch.no_grad()
def own_expert_share(model: PeftModel, batches: list[dict]) -> list[list[float]]:
    """For batch t (task t's tokens), the share of its tokens whose top-1 expert is expert t, averaged over the routed
    modules of each third of the layers (of each layer, below three layers): [task][band]. A router slot pair (router_init='arrow') counts as one
    expert."""
    model.eval()
    shares = []
    for expert, batch in enumerate(batches):
        with model.collect_routing_stats():
            model.routing_stats(reset=True)
            model(**batch)
            stats = model.routing_stats(reset=True)
        layers = {name: int(LAYER.search(name).group(1)) for name in stats}
        depth = max(layers.values()) + 1
        bands: list[list[float]] = [[] for _ in range(min(BANDS, depth))]
        for name, module in stats.items():
            usage = module.usage.reshape(len(batches), -1).sum(-1)  # slots per expert: 1, or 2 under Arrow init
            bands[layers[name] * len(bands) // depth].append(float(usage[expert]))
        shares.append([sum(band) / len(band) for band in bands])
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tasks.routing_share", description=__doc__)
    parser.add_argument("mixers", nargs="+", help="folder names under the run's mixers/ (e.g. k2-rsl-random-20-s0)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its splits)")
    parser.add_argument("--examples", type=int, default=16, help="held-out examples per task")
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
    batches = []
    for task in tasks:
        samples = mixed({task: splits[task]["heldout"]}, tokenizer, SIZES[args.size].max_length, args.examples, 0)
        batches.append(pad([{k: v for k, v in sample.items() if k != "expert_id"} for sample in samples]))
    print("| mixer | task | early layers | middle layers | late layers |\n|---|---|---|---|---|")
    for name in args.mixers:
        model = PeftModel.from_pretrained(load_base(base_dir), folder / "mixers" / name)
        for task, bands in zip(tasks, own_expert_share(model, batches)):
            print(f"| {name} | `{task}` | " + " | ".join(f"{share:.2f}" for share in bands) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
