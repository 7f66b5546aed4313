"""Data-parallel GRPO over several processes: GPUs of one or many nodes (NCCL), or CPU processes (gloo).

    torchrun --nproc_per_node 4 train_grpo.py --dataset iu_xray --batch-size 8 ...

Every rank holds the whole policy and takes its own studies; nothing else is split. One step:

    global batch of B studies (data.batch_indices, identical on every rank)
      -> rank r takes the contiguous slice [r*B/W, (r+1)*B/W)           (`shard`; W = world size)
      -> G completions per study, rewards, group advantages: all local, since a group never
         leaves its rank (only --scale-rewards batch needs the std of every rank's rewards:
         `gather_rows`)
      -> loss on the local rows divided by the GLOBAL normaliser, the sum over ranks of
         grpo.loss_normalizer (grpo.micro_batch_normalizers)                   (`sum_across_ranks`)
      -> backward -> SUM of .grad over ranks                                 (`sum_gradients`)
         = exactly the gradient of one process on the whole batch
      -> clipping and AdamW see the same gradient on every rank: the weights stay identical.

We all-reduce the gradients by hand instead of wrapping the model in DistributedDataParallel:
with LoRA only a few parameters train, a step runs a reference pass and mu update passes (the first
of which gives pi_old) over micro-batches, and one explicit `all_reduce` after the last backward is
easier to read and to check than DDP's hooks and `no_sync`.

Only rank 0 writes files (metrics, checkpoints, the SFT model) and prints; shared inputs that are
made on first use (the demo set, the untrained tiny model) are made by rank 0 while the others wait
(`rank0_first`). Every function here is the identity, or a no-op, in a single process.

Example (inside mrgr1.train.train):
    device = distributed.init(cfg.device)          # cuda:LOCAL_RANK under torchrun with GPUs
    studies = [train_studies[i] for i in distributed.shard(batch, "--batch-size")]
    ...; loss.backward(); distributed.sum_gradients(params); clip_grad_norm_(params, 1.0)
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

# How long a collective waits for the other ranks before it raises instead of hanging (torch's
# default): rank 0 writing a checkpoint or the demo set is well within it.
TIMEOUT = datetime.timedelta(minutes=30)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0; the only one in a single process)."""
    return rank() == 0


def pick_device(name: str | None) -> torch.device:
    """The device one process runs on: `name` when given, else cuda when available, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init(device_name: str | None = None, timeout: datetime.timedelta = TIMEOUT) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT
    in the environment) and return this rank's device: `--device` when it names one (a bare
    "cuda" becomes cuda:LOCAL_RANK), else cuda:LOCAL_RANK when CUDA is available, else the CPU.
    NCCL on CUDA, gloo on the CPU. A group that is already initialised (a test) is kept as it is.
    In a single process this is pick_device."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world == 1 and not dist.is_initialized():
        return pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name in (None, "cuda"):
        use_cuda = torch.cuda.is_available() if device_name is None else True
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    else:
        device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL uses the current device for its buffers
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device


def cleanup(all_finished: bool = True) -> None:
    """Leave the process group at the end of a run (nothing to do in a single process).

    all_finished: every rank got here normally, so they first wait for each other: a rank that
    tears its connections down while another still works (rank 0 writing the last files) can make
    gloo abort the process. After an error there is no such wait (the others may never come)."""
    if dist.is_available() and dist.is_initialized():
        if all_finished:
            dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where small tensors for collectives live: NCCL only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- splitting the work

def check_divisible(n: int, flag: str) -> None:
    """Each rank needs the same number of studies (whole groups): a clear error otherwise."""
    w = world_size()
    if n % w:
        raise ValueError(f"{flag} {n} does not split evenly over {w} ranks: choose a multiple of {w} "
                         f"(each rank takes {flag} / world size studies per step)")


def shard(items: list, flag: str = "--batch-size") -> list:
    """This rank's contiguous slice of a global batch: [r*B/W, (r+1)*B/W).
    >>> shard([10, 11, 12, 13])  # rank 1 of 2 gets [12, 13]; one process gets all four
    [10, 11, 12, 13]
    """
    check_divisible(len(items), flag)
    per_rank = len(items) // world_size()
    return items[rank() * per_rank:(rank() + 1) * per_rank]


def split_evenly(items: list) -> list:
    """This rank's contiguous part of a list of any length (evaluation); parts differ by <= 1."""
    n, w, r = len(items), world_size(), rank()
    return items[r * n // w:(r + 1) * n // w]


def gather_lists(mine: list) -> list:
    """Every rank's `split_evenly` part, concatenated in rank order: the whole list, on every rank."""
    if world_size() == 1:
        return mine
    parts = [None] * world_size()
    dist.all_gather_object(parts, mine)
    return [x for part in parts for x in part]


def rank_seed(seed: int, rank_: int, step: int, purpose: str) -> int:
    """The seed of a rank's sampler (purpose "rollout") or of its LoRA dropout masks ("dropout")
    at a step: differs between ranks and purposes, and depends on nothing saved, so a run resumes
    with any number of ranks."""
    digest = hashlib.sha256(f"mrgr1-{purpose}/{seed}/{rank_}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (it writes a shared file); the others run it afterwards and
    find the file made. If rank 0 fails inside, the others fail at their collective instead of
    waiting forever (the process group's timeout, or the lost connection, ends the wait)."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


# ----------------------------------------------------------------------------- reductions

def sum_across_ranks(value: float) -> float:
    """sum_r value_r (the value itself in a single process)."""
    return float(_reduce_scalar(value, torch.float64, dist.ReduceOp.SUM)) if world_size() > 1 else value


def min_across_ranks(value: int) -> int:
    """min_r value_r, the same on every rank (the value itself in a single process)."""
    return int(_reduce_scalar(value, torch.int64, dist.ReduceOp.MIN)) if world_size() > 1 else value


def _reduce_scalar(value, dtype: torch.dtype, op) -> torch.Tensor:
    t = torch.tensor([value], dtype=dtype, device=_comm_device())
    dist.all_reduce(t, op=op)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (e.g. Ctrl-C seen by one process only)."""
    return sum_across_ranks(float(flag)) > 0 if world_size() > 1 else flag


def mean_across_ranks(stats: dict) -> dict:
    """Each float metric averaged over the ranks (one collective for the whole dict). Every rank
    has the same number of rows, so row means (reward, length) are the global ones exactly;
    token-weighted ones (kl, clip ratios) weigh every rank equally."""
    if world_size() == 1:
        return stats
    keys = list(stats)  # the same code made the dict on every rank: the same order
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist()))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [n, ...] concatenated in rank order -> [W*n, ...] (same n on every rank)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """.grad <- sum over ranks of .grad, for every trainable parameter, in one flat all-reduce.
    A parameter without a gradient counts as zeros, so every rank steps the same parameters."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])                          # [sum numel]
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


@torch.no_grad()
def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values on every rank: a guarantee that all ranks start from the same weights (the
    global seed agrees, but rank 0 alone draws the demo set and the tiny model's random init)."""
    if world_size() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)
