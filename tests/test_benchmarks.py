"""The benchmark's exact training-memory count, against the bytes it must include."""

from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, tiny_model

from benchmarks.measure import Subject


def subject(rank: int) -> Subject:
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]))
    measured = Subject(model, batch=2, seq_len=12, prompt_len=6, new_tokens=2, vocab_size=VOCAB, device="cpu")
    measured.train_step()  # the optimizer's state exists from the first step on
    return measured


def test_train_state_memory_is_exact_and_counts_what_training_holds():
    small, large = subject(4), subject(32)
    assert small.train_state_memory() == small.train_state_memory()  # no allocator or resident-set noise
    weights = sum(p.numel() * p.element_size() for p in small.model.parameters())
    trainable = small.trainable_parameters() * 4
    # weights, plus gradient and two AdamW moments per trainable parameter, plus the activations saved for backward
    assert small.train_state_memory() > weights + 3 * trainable
    extra_parameters = large.trainable_parameters() - small.trainable_parameters()
    extra = large.train_state_memory() - small.train_state_memory()
    assert extra >= 4 * extra_parameters * 4  # weight, gradient, two moments, float32
    assert extra < 4 * extra_parameters * 4 + 2**20  # plus the wider LoRA hidden states, nothing like a MiB
