"""Sharded data-parallel training (FSDP2) for checkpoints that do not fit one device, like BAGEL-7B-MoT.

Launched with `torchrun`, every rank builds the model on the meta device, shards it (each LLM decoder
layer and each ViT encoder layer is its own FSDP unit; embeddings, heads and connector form the root unit
with the training forward), then materialises only its own shards, reading each tensor from the
memory-mapped safetensors file: no rank ever holds a full float32 copy of the model. Gradients are averaged
over ranks by FSDP's reduce-scatter; each rank draws its own packed batch.

Without `torchrun` (WORLD_SIZE unset or 1) nothing here is used and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from engine.checkpoint import check_keys, read_shapes
from engine.config import BagelConfig
from engine.model.bagel import Bagel
from engine.model.llm import RotaryEmbedding


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @staticmethod
    def current() -> DistEnv:
        if dist.is_available() and dist.is_initialized():
            return DistEnv(dist.get_rank(), dist.get_world_size())
        return DistEnv()


def init_from_env(device: str) -> tuple[DistEnv, str]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); returns the env and this
    rank's device (`cuda:LOCAL_RANK` on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv.current(), device


def mesh_for(device: str) -> DeviceMesh:
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def shard_units(model: Bagel, mesh: DeviceMesh) -> None:
    """One FSDP unit per LLM decoder layer and per ViT encoder layer (all-gathered one at a time)."""
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh)
    for layer in model.vit_model.vision_model.encoder.layers:
        fully_shard(layer, mesh=mesh)


def load_sharded(weights: Path, cfg: BagelConfig, device: str, mesh: DeviceMesh, wrap) -> nn.Module:
    """Build on meta, shard (`wrap(model)` returns the root module to shard), then fill each rank's
    shards tensor by tensor from the memory-mapped file. Returns the root module (model at `.model`)."""
    with torch.device("meta"):
        model = Bagel(cfg)
    check_keys(weights, {k: tuple(v.shape) for k, v in model.state_dict().items()}, read_shapes(weights), cfg)
    shard_units(model, mesh)
    root = wrap(model)
    # the module whose call runs the forward owns every parameter outside the layers
    fully_shard(root, mesh=mesh)
    root.to_empty(device=device)
    with safe_open(str(weights), framework="pt", device="cpu") as f, torch.no_grad():
        for name, param in model.named_parameters():
            full = f.get_tensor(name).to(device=device, dtype=torch.float32)
            # every rank holds the full tensor, so each keeps its own chunk with no communication
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
            del full
    model.language_model.model.rotary_emb = RotaryEmbedding(cfg.llm.head_dim, cfg.llm.rope_theta).to(device)
    return root


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or EMA entry; a collective when sharded."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref`: this rank's shard when `ref` is sharded, else `full` itself."""
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return full
