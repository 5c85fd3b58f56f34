"""
Training on several processes (GPUs or machines) with torchrun: PyTorch's DistributedDataParallel averages
the gradients, and a few collectives keep the rest of the codebooks' state the same on every rank.
train.py uses it; a plain `python train.py` is rank 0 of 1, for which every collective here does nothing.

    torchrun --standalone --nproc_per_node=2 train.py             # one machine, 2 processes (gloo on CPUs)
    torchrun --standalone --nproc_per_node=8 train.py --config=fsm_paper     # 8 GPUs (nccl)
    # two machines, 8 GPUs each: the same command on both, --node_rank=0 on HOST, --node_rank=1 on the other
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST --master_port=29500 train.py

What differs between ranks is only the data (each draws its own stream). DDP makes the gradients equal, so
every update is equal; what is not a gradient is made equal here:
  - codes set from data: computed on rank 0, then broadcast (dead-code replacement: `broadcast`; k-means
    at insertion: DDP's own broadcast of rank 0's parameters when the new model is wrapped);
  - usage buffers (counts, firings, MSE sums): summed onto rank 0 before anything reads them, so dead
    codes, alive and entropy are those of the global batch. DDP runs without its buffer sync in forward:
    its default would copy rank 0's counts over the others' at every forward.
"""

import inspect
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers.common import fail, pick_device


@dataclass
class World:
    rank: int = 0  # global rank; rank 0 evaluates, logs and writes the checkpoint and metrics.json
    local_rank: int = 0  # rank on this machine: its GPU
    size: int = 1  # number of processes
    device: str = "cpu"
    ddp: bool = False  # launched by torchrun: a process group, even of one

    @property
    def master(self):
        return self.rank == 0


def from_env(device):
    """torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE -> World; without them, rank 0 of 1.
    Checks the device and joins nothing yet (init does), so that bad input stops every rank at once."""
    if "RANK" not in os.environ:
        return World(device=pick_device(device))
    rank, local_rank, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if device == "auto":  # DDP has no backend for mps
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < local_size:
            stop(f"--device=cuda: {gpus} GPU(s) on this machine for {local_size} processes; use "
                 + (f"--nproc_per_node={gpus} or --device=cpu" if gpus else "--device=cpu"))
        device = f"cuda:{local_rank}"
    elif device != "cpu":
        stop(f"--device={device}: torchrun runs on cuda (nccl) or cpu (gloo)")
    return World(rank, local_rank, size, device, ddp=True)


def stop(msg):
    """fail(msg) from one process per machine (local rank 0); the others stop with the same code, silently."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        fail(msg)
    sys.exit(2)


def init(world):
    """Join torchrun's process group: nccl between GPUs, gloo between CPU processes."""
    if not world.ddp:
        return
    if world.device.startswith("cuda"):
        torch.cuda.set_device(world.device)
        dist.init_process_group("nccl", device_id=torch.device(world.device))
    else:
        dist.init_process_group("gloo")


def cleanup(world):
    """Leave the process group, all ranks together: none exits while rank 0 still evaluates and writes.
    Delete the DDP wrapper first: if its reducer is the last holder of the group, the group's threads are
    joined while the GIL is held, and gloo's can deadlock on the tensors of finished collectives."""
    if world.ddp:
        dist.barrier()
        dist.destroy_process_group()


def exit_process():
    """End a torchrun process without the interpreter's shutdown, as torch.multiprocessing's children end:
    during that shutdown gloo's worker threads, which keep tensors of finished collectives, can abort the
    process after a complete run. A plain run ends as usual."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def micro_batch(batch_size, accumulation_steps, world, resumed=False):
    """Sequences per forward and process: batch_size is the global batch, split over the processes and the
    gradient accumulation steps (how it is split changes an update only by float rounding)."""
    parts = world.size * accumulation_steps
    if batch_size % parts:
        stop(("cannot resume: " if resumed else "") + f"--batch_size={batch_size} does not split over "
             f"{world.size} process(es) x {accumulation_steps} accumulation step(s); change --batch_size or "
             "--gradient_accumulation_steps")
    return batch_size // parts


def data_seed(seed, rank):
    """Each rank's data stream: rank 0 keeps `seed` (a plain run's stream); the others are far from
    seed + 1, which train.py uses for the FSM's validation set."""
    return seed + 1_000_003 * rank


def wrap(model, world):
    """DDP around the model for the forward and backward (a plain run: the model itself). DDP's
    construction copies rank 0's parameters to every rank: that is how codebooks inserted on rank 0 (k-means)
    reach the others, so wrap the new model right after an insertion."""
    if not world.ddp:
        return model
    # no buffer sync in forward: the usage buffers are per-rank sums (before torch 2.13: broadcast_buffers)
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    ddp = DDP(model, device_ids=[world.local_rank] if world.device.startswith("cuda") else None, **{key: False})
    if not world.master:  # DDP copied rank 0's buffers at init: a resumed run's totals must stay on rank 0 only
        for cb in model.codebooks().values():
            for buf in (cb.uses_since_read, cb.uses_since_reset, cb.mse_sum, cb.mse_n):
                buf.zero_()
    return ddp


@torch.no_grad()
def reduce_usage(model, world):
    """Sum every codebook's counts, firings and MSE sums over ranks onto rank 0, zero them on the others.
    Rank 0 then reads stats and dead codes of the global batch; the sum over ranks is unchanged, so a
    second call counts nothing twice. One collective for all codebooks."""
    bufs = [b for cb in model.codebooks().values() for b in (cb.uses_since_read, cb.uses_since_reset, cb.mse_sum, cb.mse_n)]
    if not world.ddp or not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.reduce(flat, dst=0)
    for b, part in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(part.view_as(b)) if world.master else b.zero_()


@torch.no_grad()
def broadcast(tensors, world):
    """Rank 0's values of tensors (parameters, codes), in place, on every rank."""
    if world.ddp:
        for t in tensors:
            dist.broadcast(t.detach(), src=0)


def mean(values, world):
    """Mean over ranks of scalar tensors (None stays None), for the log line."""
    if not world.ddp:
        return values
    live = torch.stack([v.float() for v in values if v is not None])
    dist.all_reduce(live)  # SUM: gloo has no AVG
    out = iter(live / world.size)
    return [None if v is None else next(out) for v in values]


def gather(obj, world):
    """[rank 0's obj, rank 1's, ...] on every rank (the data generators' states, for the checkpoint)."""
    if not world.ddp:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
