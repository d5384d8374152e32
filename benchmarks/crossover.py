"""Where computing only the selected experts starts to beat the dense wide LoRA, for one projection.

    PYTHONPATH=src python -m benchmarks.crossover

Times one 512 -> 512 projection with E rank-8 experts, forward + backward (training) and forward alone without
autograd (generation), on each path, for several token counts: under `topk`, and under `hard_soft` in training
(its straight-through router gradient costs the selected path two dense matrix multiplies more; without autograd it
is `topk`). The thresholds in `peft_lora_mixer.selected_experts` were set from its output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from peft_lora_mixer.layer import ExpertSpec, LoraMixerLayer
from peft_lora_mixer.routing import SPARSE_ROUTING_MODES

from .tables import markdown_row, markdown_table


def time_layer(layer: LoraMixerLayer, x: torch.Tensor, train: bool, selected: bool, repeats: int) -> float:
    """Median milliseconds of one call, on the path `selected` forces."""
    with mock.patch("peft_lora_mixer.layer.prefer_selected_experts", return_value=selected):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with torch.set_grad_enabled(train):
                out = layer(x)
                if train:
                    out.backward(torch.ones_like(out))
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 256, 1024])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--routing", nargs="+", choices=SPARSE_ROUTING_MODES, default=list(SPARSE_ROUTING_MODES))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch (the thresholds used 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = ["tokens", "mode", "routing", "E", "k", "dense ms", "selected ms", "selected / dense"]
    print(markdown_table(header, []), flush=True)  # the rows follow as they are measured
    modes = [(train, routing) for train in (True, False) for routing in args.routing if train or routing == "topk"]
    for tokens in args.tokens:
        x = torch.randn(tokens, args.features, requires_grad=True)
        for train, routing in modes:
            for num_experts in args.experts:
                for top_k in (1, 2):
                    if top_k >= num_experts:
                        continue
                    base = torch.nn.Linear(args.features, args.features).requires_grad_(False)
                    layer = LoraMixerLayer(
                        base,
                        "default",
                        [ExpertSpec(args.rank, 1.0)] * num_experts,
                        routing=routing,
                        top_k=top_k,
                        router_temperature=1.0,
                        lora_dropout=0.0,
                        init_weights=False,
                    )
                    dense, selected = (time_layer(layer, x, train, path, args.repeats) for path in (False, True))
                    mode = "train" if train else "infer"
                    figures = [f"{dense:.2f}", f"{selected:.2f}", f"{selected / dense:.2f}"]
                    print(markdown_row([tokens, mode, routing, num_experts, top_k, *figures]), flush=True)


if __name__ == "__main__":
    main()
