"""Multi-process training (one process per GPU, one or several machines) through ``torchrun``.

``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them and joins the process group: NCCL on CUDA, Gloo on CPU. Without
those variables (or with ``WORLD_SIZE=1``) training runs in one process and nothing here does any communication.

Rules every caller follows: only rank 0 writes files (checkpoints, logs, reports); metrics are summed across ranks
before they are scored; a barrier separates "rank 0 wrote a file" from "everyone reads it".

BatchNorm: the InvPT decoder has 50 BatchNorm layers (PASCAL). Upstream trains them as ``SyncBatchNorm`` (statistics
over the global batch). :func:`wrap_model` converts them when several CUDA processes train; PyTorch's SyncBatchNorm
has no CPU implementation, so several CPU (Gloo) processes normalise each with its own batch statistics (a warning
says so) unless BatchNorm statistics are frozen (``--freeze-bn-stats``), which makes every sample's forward pass
independent of the others in its batch.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from invpt.errors import InputError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # True when init_distributed created the process group (and cleanup destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.device.index or 0])
            else:
                torch.distributed.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over all processes (in place when distributed; returned either way)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables; (0, 1, 0) without them."""
    def read(name: str, default: int) -> int:
        text = os.environ.get(name)
        if text is None or text == "":
            return default
        try:
            return int(text)
        except ValueError:
            raise InputError(f"Environment variable {name}={text!r} is not an integer; torchrun sets it. Unset it "
                             "to train in one process, or start the run with torchrun.") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} / WORLD_SIZE={world} is not a valid process layout (0 <= RANK < WORLD_SIZE). "
                         "Start multi-process training with torchrun, which sets both.")
    return rank, world, local


def resolve_train_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """The device this process trains on: ``auto`` picks CUDA when available; several processes on CUDA each take
    ``cuda:LOCAL_RANK``."""
    from invpt.checkpoint import resolve_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world_size > 1:
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise InputError(
                    f"This machine runs process LOCAL_RANK={local_rank} but PyTorch sees {count} GPU(s); "
                    f"torchrun --nproc_per_node must not exceed the GPU count ({count}), or train on CPU with --device cpu."
                )
            if dev.index is not None and dev.index != local_rank:
                _logger.warning("--device %s ignored for process %d: under torchrun each process uses cuda:LOCAL_RANK",
                                device, local_rank)
            dev = torch.device("cuda", local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device.

    Reuses a process group the caller already initialised (and then leaves it alone in :func:`cleanup`).
    """
    rank, world, local = env_ranks()
    dev = resolve_train_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistContext(device=dev)
    if not torch.distributed.is_available():
        raise InputError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; train in one process.")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                             **kwargs)
        owns = True
    else:
        backend = torch.distributed.get_backend()
    if rank == 0:
        _logger.info("distributed training: %d processes, backend %s, this is rank %d on %s", world, backend, rank, dev)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, owns_group=owns)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool = True) -> nn.Module:
    """Wrap ``model`` for data-parallel training (DDP) when several processes train; else return it unchanged.

    ``find_unused_parameters=True`` as upstream: the official architecture carries dead weights (``redu_chan.0``,
    ``norm_mt``, stage-0 ``fuse_attn``, ``scale_embed.2``) that never receive a gradient.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        _logger.info("BatchNorm -> SyncBatchNorm: statistics over the global batch of %d processes", ctx.world_size)
    elif sync_bn and ctx.is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        _logger.warning(
            "BatchNorm statistics are per process: PyTorch's SyncBatchNorm runs on CUDA only, so each of the %d CPU "
            "processes normalises with its own batch (upstream syncs them on GPUs). Pass --freeze-bn-stats to use the "
            "running statistics instead, or train on GPUs.", ctx.world_size)
    import warnings

    # timm's cls_token / pos_embed get gradients with expanded strides; DDP notes once per process that their 1 x 1 x C
    # bucket views need a copy, which costs nothing measurable. The note is dropped so that logs stay readable.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class ResumableSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` (also used with one process) that can start mid-epoch.

    The epoch's order is the seeded permutation DistributedSampler draws from ``seed + epoch``; process ``r`` takes
    every ``world``-th index from ``r``. So the global batch at step ``k`` holds the same images whatever the number
    of processes, for the same global batch size. ``set_start(n)`` skips this process's first ``n`` indices of the
    epoch (the batches a resumed run already consumed); it applies until the next :meth:`set_epoch`.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        super().__init__(range(dataset_len), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, n: int) -> None:
        self.start = max(0, int(n))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class ShardSampler(Sampler[int]):
    """Evaluation order: process ``r`` of ``world`` takes indices ``r, r + world, ...`` once each (no padding, so no
    image is counted twice when the per-process metric sums are added)."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
