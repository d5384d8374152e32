"""`rsl_balance_scope="global_batch"`: the balance statistics over every data-parallel process's tokens, so that
N processes on N shares of a batch train like one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mixers import rsl_mixer

from peft_lora_mixer import LoraMixerConfig

WORLD_SIZE = 2


def full_batch() -> dict[str, torch.Tensor]:
    """Four unpadded sequences: every process's share has the same number of tokens."""
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(7))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def loss_and_gradients(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(task loss plus the reported RSL, the gradients), the RSL's gradient reaching the routers by itself."""
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    objective = loss.detach() + model.routing_loss().total
    return objective, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def run_rank(rank: int, init_file: str, scope: str, results: str) -> None:
    """One data-parallel process: its share of the batch, gradients averaged over processes as DDP does."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = rsl_mixer(rsl_balance_scope=scope)
        share = {key: value.chunk(WORLD_SIZE)[rank] for key, value in full_batch().items()}
        loss, gradients = loss_and_gradients(model, share)
        for value in [loss, *gradients.values()]:
            dist.all_reduce(value)
            value /= WORLD_SIZE
        if rank == 0:
            torch.save((loss, gradients), results)
    finally:
        dist.destroy_process_group()


def test_config_refuses_an_unknown_balance_scope():
    with pytest.raises(ValueError, match="rsl_balance_scope"):
        LoraMixerConfig(rsl_balance_scope="epoch")


def test_global_batch_in_a_single_process_group_equals_micro_batch(tmp_path):
    inputs = full_batch()
    expected = loss_and_gradients(rsl_mixer(), inputs)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        got = loss_and_gradients(rsl_mixer(rsl_balance_scope="global_batch"), inputs)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
    for name, value in expected[1].items():
        torch.testing.assert_close(got[1][name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_two_processes_with_global_batch_statistics_equal_one_process_on_the_whole_batch(tmp_path):
    single_loss, single_gradients = loss_and_gradients(rsl_mixer(), full_batch())
    results = {}
    for scope in ("global_batch", "micro_batch"):
        results[scope] = str(tmp_path / f"{scope}.pt")
        mp.spawn(run_rank, args=(str(tmp_path / f"init-{scope}"), scope, results[scope]), nprocs=WORLD_SIZE)
    loss, gradients = torch.load(results["global_batch"])
    torch.testing.assert_close(loss, single_loss, rtol=1e-5, atol=1e-6)
    for name, value in single_gradients.items():
        torch.testing.assert_close(gradients[name], value, rtol=1e-4, atol=1e-6, msg=name)
    micro_loss, micro_gradients = torch.load(results["micro_batch"])  # the default differs: the option matters
    assert abs(micro_loss - single_loss) > 1e-4
    assert any(
        not torch.allclose(micro_gradients[n], v, rtol=1e-4, atol=1e-6)
        for n, v in single_gradients.items()
        if "router" in n
    )
