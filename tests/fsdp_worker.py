"""One FSDP2 (`fully_shard`) training step of the domains mixer, run by `torch.distributed.run` from test_fsdp.

Each process takes its slice of the global batch, shards the model (`--sharding manual`: every decoder layer, then
the whole model; `accelerate`: accelerate's own FSDP2 preparation, configured by examples/accelerate_fsdp2.yaml,
which launched by accelerate only runs on GPUs), runs forward and backward (FSDP averages the gradients over
processes) and one SGD step. Rank 0 writes the losses, the full gradients of the trainable parameters, and the
logits of the updated model on probe inputs to `--out/step.pt`, and saves the full (unsharded) adapter to
`--out/adapter`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from domains import mixed_samples, mixer_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import default_data_collator

LEARNING_RATE = 0.5
GLOBAL_BATCH = 8
ACCELERATE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "accelerate_fsdp2.yaml"


def global_batch() -> dict[str, torch.Tensor]:
    samples = [{k: v for k, v in s.items() if k != "expert_id"} for s in mixed_samples(2, seed=4)]
    return default_data_collator(samples)


def build_model(rsl: bool) -> torch.nn.Module:
    """The domains mixer, experts and routers trainable; random experts (B not zero) so the routers get a task
    gradient too."""
    model = mixer_model(add_routing_loss=rsl, init_weights=False)
    model.set_trainable(routers=True, experts=True)
    return model


def probe_inputs() -> torch.Tensor:
    return global_batch()["input_ids"][::3]


def accelerate_fsdp2(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """Shard as accelerate's FSDP plugin does from the example config (full precision, the test's device)."""
    options = yaml.safe_load(ACCELERATE_CONFIG.read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=options["fsdp_version"],
        auto_wrap_policy=options["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[options["fsdp_transformer_layer_cls_to_wrap"]],
        reshard_after_forward=options["fsdp_reshard_after_forward"],
        state_dict_type=options["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=options["fsdp_cpu_ram_efficient_loading"],
    )
    # the few Accelerator attributes the preparation reads: the launcher builds a real one only on GPUs
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        device=torch.device("cpu"),
        is_main_process=rank == 0,
        mixed_precision="no",
        parallelism_config=None,
    )
    return fsdp2_prepare_model(accelerator, model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rsl", action="store_true")
    parser.add_argument("--sharding", choices=("manual", "accelerate"), default="manual")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build_model(args.rsl)
    if args.sharding == "accelerate":
        model = accelerate_fsdp2(model, rank)
    else:
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    share = GLOBAL_BATCH // world
    micro = {k: v[rank * share : (rank + 1) * share] for k, v in global_batch().items()}
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
