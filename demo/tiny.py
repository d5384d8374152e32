"""The offline miniature's workload: a tiny Llama pretrained on the spot, synthetic string-transformation domains,
exact-match accuracy as the metric."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from benchmarks.training import fit
from benchmarks.workloads import model_from_config

from .tasks import DOMAINS, EOS_ID, PAD_ID, PRETRAIN, VOCAB, training_samples
from .train_eval import exact_match
from .workload import Workload


def tiny_base_model(hidden_size: int, layers: int, seed: int) -> PreTrainedModel:
    """A small Llama over the tasks' vocabulary, randomly initialised (it is pretrained on the copy task next)."""
    config = dict(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return model_from_config("llama", config, seed)


class TinyWorkload(Workload):
    """Pretrains the base model once (`prepare`), then serves the task domains' samples and their evaluation."""

    metric = "accuracy"
    higher_is_better = True
    domains = [domain.name for domain in DOMAINS]

    def prepare(self) -> None:
        model = tiny_base_model(self.size.hidden_size, self.size.layers, self.seed)
        samples = training_samples(PRETRAIN, 0, self.size.pretrain_steps * self.size.batch_size, self.seed)
        self.log(f"pretraining the base model on {PRETRAIN.name!r}")
        fit(model, samples, self.size.pretrain_steps, self.size.lr, self.seed, batch_size=self.size.batch_size)
        model.save_pretrained(self.base_dir)

    def base(self) -> AutoModelForCausalLM:
        return AutoModelForCausalLM.from_pretrained(self.base_dir)

    def training_samples(self, index: int, count: int, seed: int) -> list[dict]:
        return training_samples(DOMAINS[index], index, count, seed)

    def heldout_samples(self, index: int) -> list[dict]:
        return training_samples(DOMAINS[index], index, self.size.eval_count, self.seed + 1000)

    def scores(self, model: torch.nn.Module, losses: dict[str, float]) -> dict[str, float]:
        """Exact-match accuracy of greedy answers to the held-out prompts (the losses are not needed)."""
        return {domain.name: exact_match(model, domain, self.size.eval_count, self.seed + 1000) for domain in DOMAINS}
