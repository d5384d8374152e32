"""Best-expert router labels: each sample's expert is the one whose plain PEFT LoRA gives it the lowest loss."""

import pytest
import torch
from lora_experts import save_lora
from peft import PeftModel
from tiny_models import VOCAB, tiny_model

from peft_lora_mixer import best_expert_labels, from_experts

TARGETS = {"llama": ["q_proj", "v_proj"], "t5": ["q", "v"], "mamba": ["in_proj"]}


def samples(count: int, length: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:2] = -100  # a prompt
        made.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return made


def peft_lora_loss(model_type: str, folder: str, sample: dict) -> float:
    """The sample's loss under the expert as PEFT itself loads it (the model's own loss: mean over its labels)."""
    lora = PeftModel.from_pretrained(tiny_model(model_type), folder).eval()
    with torch.no_grad():
        return float(lora(**{key: value[None] for key, value in sample.items()}).loss)


@pytest.mark.parametrize(
    "model_type, router_init", [("llama", "random"), ("llama", "arrow"), ("t5", "random"), ("mamba", "random")]
)
def test_labels_are_each_samples_lowest_loss_expert_under_plain_peft_lora(tmp_path, model_type, router_init):
    base = tiny_model(model_type)
    folders = [
        save_lora(
            str(tmp_path / f"e{i}"),
            seed=i,
            base=tiny_model(model_type),
            r=4,
            lora_alpha=64,
            target_modules=TARGETS[model_type],
        )
        for i in range(3)
    ]
    model = from_experts(base, folders, top_k=1, router_init=router_init)
    model.train()
    data = samples(10)
    labels = best_expert_labels(model, data, batch_size=4)
    expected = [
        min(range(3), key=lambda expert: peft_lora_loss(model_type, folders[expert], sample)) for sample in data
    ]
    assert labels == expected
    assert len(set(labels)) > 1  # the experts differ enough that the check could fail
    assert model.training  # left in the mode it was in


def test_a_sample_without_labelled_tokens_gets_no_label(tmp_path):
    folders = [save_lora(str(tmp_path / f"e{i}"), seed=i, r=2, target_modules=["q_proj"]) for i in range(2)]
    model = from_experts(tiny_model("llama"), folders)
    data = samples(3)
    data[1]["labels"][:] = -100
    labels = best_expert_labels(model, data)
    assert labels[1] == -100 and labels[0] in (0, 1) and labels[2] in (0, 1)


def test_a_model_that_is_not_a_mixer_is_refused():
    with pytest.raises(TypeError, match="LoRA-Mixer"):
        best_expert_labels(tiny_model("llama"), samples(2))
