"""Supervised fine-tuning of a LoRA-Mixer model with `trl.SFTTrainer`, offline, on a tiny model (seconds).

The dataset is prompt-completion, so SFTTrainer scores the completions only. SFTTrainer computes its loss from
fused log-probabilities rather than taking `outputs.loss`; the Routing Specialization Loss reaches the routers all
the same (its gradient rides on their probabilities). `RoutingCallback` logs the RSL and the routing statistics
with the loss. Two regimes:

    python examples/trl_sft.py                                # joint: experts and routers train together
    python examples/trl_sft.py --experts ./lora-a ./lora-b    # plug-and-play: frozen LoRA experts, routers train

With a real model, replace the tiny llama and word tokenizer by `AutoModelForCausalLM.from_pretrained(...)` and
`AutoTokenizer.from_pretrained(...)`; everything else stays as it is. On the random tiny model the loss barely moves
(its base is frozen and untrained): the example shows the wiring, not learning. SFTConfig turns bf16 autocast on by
default where the hardware supports it.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from peft_lora_mixer import LoraMixerConfig, RoutingCallback, from_experts

WORDS = [f"w{i}" for i in range(125)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word tokenizer over `SPECIAL + WORDS`, built without any download."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(SPECIAL + WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def copy_task(count: int) -> Dataset:
    """Prompt: 4 words; completion: the same words reversed (learnable, and scored on the completion only)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for ids in torch.randint(0, len(WORDS), (count, 4), generator=generator).tolist():
        rows.append(
            {"prompt": " ".join(WORDS[i] for i in ids), "completion": " " + " ".join(WORDS[i] for i in reversed(ids))}
        )
    return Dataset.from_list(rows)


def build_model(experts: list[str]) -> PeftModel:
    routing = dict(top_k=2, rsl_balance_weight=0.1, rsl_entropy_weight=0.1)
    if experts:  # frozen experts, routers only
        return from_experts(tiny_llama(), experts, **routing)
    return get_peft_model(tiny_llama(), LoraMixerConfig(r=8, lora_alpha=16, num_experts=4, **routing))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", nargs="*", default=[], help="PEFT LoRA folders or Hub ids (plug-and-play)")
    parser.add_argument("--max-steps", type=int, default=60)
    args = parser.parse_args()

    model = build_model(args.experts)
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            logging_steps=max(1, args.max_steps // 6),
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            log_level="error",
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=copy_task(256),
            processing_class=word_tokenizer(),
            callbacks=[RoutingCallback()],
        )
        trainer.train()
    for log in (h for h in trainer.state.log_history if "loss" in h):
        print(
            f"step {log['step']:>3}  loss {log['loss']:.3f}  rsl {log['rsl/total']:.3f}  "
            f"routing entropy {log['routing/entropy']:.3f}  balance {log['routing/balance']:.3f}"
        )


if __name__ == "__main__":
    main()
