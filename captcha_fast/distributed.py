"""The processes of a training run: one, or torchrun's several (DistributedDataParallel).

    torchrun --nproc_per_node 2 -m captcha_fast train DATA --out RUN_DIR

Rank and world size come from torchrun's environment; gloo on the CPU, NCCL on CUDA."""
from __future__ import annotations

import os
from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


class Dist:
    """Rank, world size and the collectives (no-ops in one process). Under torchrun with CUDA,
    each rank trains on cuda:LOCAL_RANK (self.device)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = False
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = device  # NCCL reduces CUDA tensors only
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model, or its DistributedDataParallel wrapper when there are several ranks."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                   else None)

    def sum(self, values: Sequence[float]) -> List[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def average_buffers(self, model: nn.Module) -> None:
        """Average the batch-norm running statistics over ranks (each rank saw its own shards;
        DDP only copies rank 0's at the next forward), so every rank holds the same model. Modules in
        eval mode (frozen: train --freeze) keep theirs: every rank holds the same, and a sum over
        ranks divided again need not give it back bit for bit."""
        if self.world > 1:
            for module in model.modules():
                for b in module.buffers(recurse=False):
                    if b.is_floating_point() and module.training:
                        dist.all_reduce(b)
                        b.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started:
            dist.destroy_process_group()
