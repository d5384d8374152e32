"""One FSDP2 (`fully_shard`) training step of the domains mixer, run by `torch.distributed.run` from test_fsdp.

Each process takes its slice of the global batch, shards every decoder layer and the whole model, runs forward and
backward (FSDP averages the gradients over processes) and one SGD step. Rank 0 writes the losses, the full
gradients of the trainable parameters, and the logits of the updated model on probe inputs to `--out/step.pt`,
and saves the full (unsharded) adapter to `--out/adapter`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from domains import mixed_samples, mixer_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import default_data_collator

LEARNING_RATE = 0.5
GLOBAL_BATCH = 8


def global_batch() -> dict[str, torch.Tensor]:
    samples = [{k: v for k, v in s.items() if k != "expert_id"} for s in mixed_samples(2, seed=4)]
    return default_data_collator(samples)


def probe_inputs() -> torch.Tensor:
    return global_batch()["input_ids"][::3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rsl", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = mixer_model(add_routing_loss=args.rsl)
    model.set_trainable(routers=True, experts=True)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    share = GLOBAL_BATCH // world
    micro = {k: v[rank * share:(rank + 1) * share] for k, v in global_batch().items()}
    model.train()
    loss = model(**micro).loss
    loss.backward()
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    grads = {name: param.grad.full_tensor() for name, param in trainable.items()}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    with torch.no_grad():
        for param in trainable.values():
            param -= LEARNING_RATE * param.grad

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_inputs()).logits
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "grads": grads, "logits": logits}, args.out / "step.pt")
        model.save_pretrained(args.out / "adapter", state_dict=state)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
