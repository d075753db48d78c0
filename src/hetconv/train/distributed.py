"""Process-group setup for ``torchrun`` and the few collectives the engine needs.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the engine joins the
process group (``nccl`` on GPUs, ``gloo`` on CPU), pins one GPU per local rank, and
wraps the model in DistributedDataParallel.  Only rank 0 writes files; metrics are
summed over ranks so every rank reports the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = ["DistContext", "EvalShardSampler", "SeededItems", "TrainSampler",
           "setup_distributed"]


@dataclass
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: List[float]) -> List[float]:
        """Element-wise sum of ``values`` over all ranks (float64, exact for counts)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one collective)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, indexed by rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) in ``module`` on every rank."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if there is one; pick this process's device.

    ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank, world_size, local_rank, dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        ctx.owns_group = True
    if dist.is_initialized():
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    return ctx


class TrainSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation (``set_epoch`` before each epoch).

    The permutation depends only on ``(seed, epoch)``, so an epoch is identical whether
    the run was interrupted before it or not.  Every rank gets ``ceil(n / world)``
    indices (the permutation wraps around to even the shares, like
    ``DistributedSampler``).

    ``item_seeds``: yield ``(index, seed)`` pairs instead, ``seed`` a function of
    ``(seed, epoch, index)`` only, for :class:`SeededItems` to draw each image's random
    augmentation from: the same whatever the number of loader workers or processes.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, item_seeds: bool = False) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle, self.item_seeds = shuffle, item_seeds
        self.epoch = 0
        self.num_samples = -(-size // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.world_size
        order = (order * (-(-total // max(len(order), 1))))[:total]
        mine = order[self.rank:total:self.world_size]
        if self.item_seeds:
            return iter([(i, _mix(self.seed, self.epoch, i)) for i in mine])
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples


def _mix(*values: int) -> int:
    """A 63-bit seed from ``values`` (splitmix64 steps): neighbouring inputs, unrelated seeds."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & mask)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: the item's transform draws its randomness
    (torch's default generator) from ``seed``; the caller's generator state is kept."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, seed = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class EvalShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every image exactly once over all ranks
    (no padding, so summed metrics are exact)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
