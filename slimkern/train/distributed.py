r"""Data-parallel training with ``torch.distributed``: ``slimkern train --nproc N`` or ``torchrun``.

:math:`W` processes (ranks) each hold the whole net and train on their share of every global
batch (:class:`~slimkern.train.shard_sampler.RankShardSampler`). A step on rank ``r``:

1. forward all of the step's switches in one packed pass on the rank batch :math:`x_r`, BN
   layers normalising with the statistics of the **global** batch (below);
2. one backward of the summed per-switch losses :math:`\mathcal{L}_r` (or the groups of
   ``packed_step``): ``.grad`` holds :math:`\nabla \mathcal{L}_r`;
3. **one all-reduce** of all gradients, flattened into buckets of at most ``bucket_mb`` (one
   bucket for small nets; the step's logged loss terms ride in the last bucket), divided by
   :math:`W`: every rank now holds :math:`\frac1W\sum_r \nabla\mathcal{L}_r`, which is the gradient
   of the batch-:math:`Wb` loss (each loss term is a mean over the batch and rank batches are
   equal);
4. the same optimizer step on every rank, so weights stay bit-identical without broadcasts.

Why a manual all-reduce after backward and not ``DistributedDataParallel`` around the net:
a step is ``slimkern.forward_switches`` (it installs a packed plan in every layer and calls the
net), or ``packed_step``'s several backward passes for one optimizer step, not one call of the
wrapped module's ``forward``, which is what DDP's reducer hooks count on; DDP would all-reduce
after every backward of a group unless told ``no_sync``, would need ``find_unused_parameters``
(switches narrower than the widest leave parameters without gradient), and by default
broadcasts buffers it listed at construction, while switchable BN *replaces* its statistics
buffers whenever a new switch gets a row. One bucketed all-reduce after the last backward is
exactly "one all-reduce of the summed per-switch gradients per step"; what it gives up is
DDP's overlap of communication with the backward.

BN statistics: **synchronised batch statistics** (``sync_bn=True``, the default;
:mod:`slimkern.train.sync_batch_norm`). Each switchable BN layer all-reduces per-channel
sums, so rank batches of :math:`b` normalise exactly as one batch of :math:`Wb` would: :math:`W`
processes compute the same function, gradients and running rows as one process with
:math:`W\times` the batch (tested to 1e-5), and the rows are identical on every rank. Per-rank
statistics with a later all-reduce of the running rows (``sync_bn=False``: DDP's default
behaviour plus an average of the rows before each checkpoint) train a different function (ghost
batches of :math:`b`) and average variances that ignore the spread between rank means; we
chose the exact variant because slimmable nets train many switches at small rank batches
(ParaDiS' ``[4x0.25]`` branches see a quarter of the channels), the regime where per-rank
statistics hurt most, and because it makes every multi-process run checkable against a
single-process one. Cost: 4 small all-reduces per BN layer per step, and BN runs as torch ops
rather than the fused kernel while synchronised.

Checkpoints: every rank takes part in a consistency check (parameter and buffer checksums
all-reduced with MIN and MAX: any difference between ranks raises), then rank 0 alone writes
the file atomically (``atomic_save``: temporary file + ``os.replace``), so a kill at any time
leaves the previous checkpoint whole. Resume: after rank 0 decides what to load, its whole
trainer state (weights, BN rows, optimizer, schedule, generators, RNG, history) is broadcast,
so all ranks continue from one state even without a shared file system.

Launching: :func:`launch` starts ``N`` copies of a command with torchrun's environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; ``OMP_NUM_THREADS=1`` unless set), stops all of them as soon as one fails,
and children die with the launcher (Linux ``PR_SET_PDEATHSIG``). :func:`init_from_env` joins
the group in each child: ``gloo`` on CPU, ``nccl`` (one GPU per local rank) when CUDA is
available, or as asked. The same code runs under ``torchrun --nproc-per-node N -m slimkern
train ...``.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkern.train.shard_sampler import RankShardSampler

__all__ = ["DataParallel", "init_from_env", "launch", "launched", "shutdown"]

log = logging.getLogger("slimkern.train")

BACKENDS = ("auto", "gloo", "nccl")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DataParallel:
    """This process's place in a data-parallel run, and the collectives a trainer needs.

    Args:
        group: the process group (None: the default group, which must be initialised).
        device: where this rank trains (None: CPU for gloo, ``cuda:<local rank>`` for nccl).
        sync_bn: synchronised BN batch statistics (True) or per-rank statistics whose running
            rows are averaged before each checkpoint (False); see the module docstring.
        bucket_mb: gradient all-reduce bucket size in MiB.
    """

    def __init__(self, group=None, device: str | torch.device | None = None, sync_bn: bool = True,
                 bucket_mb: float = 25.0):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group "
                               "(slimkern.train.distributed.init_from_env, or dist.init_process_group)")
        if not isinstance(sync_bn, bool):
            raise TypeError(f"DataParallel: sync_bn must be a bool, got {type(sync_bn).__name__}")
        if not bucket_mb > 0:
            raise ValueError(f"DataParallel: bucket_mb must be > 0, got {bucket_mb!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.sync_bn = sync_bn
        self.bucket_bytes = int(bucket_mb * 2**20)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"DataParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, sync_bn={self.sync_bn})")

    # ----- data ----------------------------------------------------------------------------
    def loader(self, data: Dataset, batch_size: int, generator: torch.Generator) -> DataLoader:
        """This rank's loader: ``batch_size`` samples per rank of each global batch."""
        if isinstance(data, DataLoader):
            raise TypeError("data-parallel training shards a Dataset itself; pass the Dataset, not a DataLoader")
        if not isinstance(data, Dataset):
            raise TypeError(f"data must be a Dataset, got {type(data).__name__}")
        sampler = RankShardSampler(len(data), self.rank, self.world_size, batch_size, generator)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, generator=generator)

    # ----- one step --------------------------------------------------------------------------
    def forward_context(self, net: nn.Module):
        """Wrap a training forward: BN layers use the global batch's statistics (``sync_bn``)."""
        if not self.sync_bn:
            return contextlib.nullcontext(net)
        from slimkern.train.sync_batch_norm import synchronised_batch_norm

        return synchronised_batch_norm(net, self._group())

    def average_gradients(self, net: nn.Module, values: dict[str, float] | None = None) -> dict[str, float]:
        r"""``p.grad <- (1/W) \sum_r p.grad_r`` for every parameter with a gradient, in buckets of
        at most ``bucket_mb`` (one all-reduce for a small net); ``values`` (the step's loss
        terms) are averaged in the same call and returned."""
        import torch.distributed as dist

        values = dict(values or {})
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise NotImplementedError("DataParallel: sparse gradients are not supported")
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for g in grads:
            nbytes = g.numel() * g.element_size()
            if not buckets or size + nbytes > self.bucket_bytes or buckets[-1][0].dtype != g.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += nbytes
        ride = bool(buckets) and buckets[-1][0].dtype in (torch.float32, torch.float64)
        extra = torch.tensor(list(values.values()), dtype=buckets[-1][0].dtype if ride else torch.float64,
                             device=grads[0].device if grads else self.device)
        for i, bucket in enumerate(buckets):
            parts = [g.reshape(-1) for g in bucket] + ([extra] if ride and i == len(buckets) - 1 else [])
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
            at = 0
            for g in bucket:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
            if ride and i == len(buckets) - 1:
                extra = flat[at:]
        if not ride and values:
            dist.all_reduce(extra, group=self.group)
            extra /= self.world_size
        return dict(zip(values, extra.tolist()))

    # ----- state ------------------------------------------------------------------------------
    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank, serialised by ``torch.save`` and read back with
        ``weights_only=True`` (tensors, containers, numbers, strings: what a checkpoint holds)."""
        import torch.distributed as dist

        box = [None]
        if self.is_main:
            buf = io.BytesIO()
            torch.save(obj, buf)
            box = [buf.getvalue()]
        dist.broadcast_object_list(box, src=self._global_rank0(), group=self.group,
                                   device=self.device if self.backend == "nccl" else None)
        if self.is_main:
            return obj
        return torch.load(io.BytesIO(box[0]), map_location=self.device, weights_only=True)

    def sync_trainer(self, trainer) -> None:
        """Every rank continues from rank 0's trainer state (fresh or resumed)."""
        state = self.broadcast_object(trainer.state_dict())
        if not self.is_main:
            trainer.load_state_dict(state)

    def average_buffers(self, net: nn.Module) -> None:
        """All-reduce mean of every floating-point buffer (BN running rows after per-rank statistics)."""
        import torch.distributed as dist

        for b in net.buffers():
            if b.is_floating_point():
                dist.all_reduce(b, group=self.group)
                b.div_(self.world_size)

    def check_in_sync(self, net: nn.Module) -> None:
        """Raise RuntimeError on every rank if any parameter or buffer differs between ranks.

        Two checksums per tensor over its bits read as integers (plain and position-weighted
        sums; integer addition does not depend on summation order, so identical tensors give
        identical sums on any machine), all-reduced with MIN and MAX."""
        import torch.distributed as dist

        sums = []
        for t in list(net.parameters()) + list(net.buffers()):
            v = t.detach().contiguous().reshape(-1)
            bits = v.view(_INT_OF_SIZE[v.element_size()]).long()
            w = torch.arange(bits.numel(), device=bits.device) % 97 + 1
            sums += [bits.sum(), (bits * w).sum()]
        if not sums:
            return
        hi = torch.stack(sums)
        lo = hi.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        bad = (hi != lo).nonzero().reshape(-1).tolist()
        if bad:
            names = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
            raise RuntimeError(f"data-parallel ranks diverged: {sorted({names[i // 2] for i in bad})[:8]} differ "
                               "between ranks")

    def prepare_checkpoint(self, net: nn.Module) -> bool:
        """Collective, on every rank before a checkpoint: average per-rank BN rows (``sync_bn``
        off), check all ranks hold the same state. Returns True on the rank that writes (0)."""
        if not self.sync_bn:
            self.average_buffers(net)
        self.check_in_sync(net)
        return self.is_main

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def _group(self):
        import torch.distributed as dist

        return self.group if self.group is not None else dist.group.WORLD

    def _global_rank0(self) -> int:
        import torch.distributed as dist

        return 0 if self.group is None else dist.get_global_rank(self.group, 0)


# ----------------------------------------------------------------------------------------- processes

def launched() -> bool:
    """True inside a process started by :func:`launch` or torchrun (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(backend: str = "auto", sync_bn: bool = True, timeout_s: float = 600.0) -> DataParallel | None:
    """Join the process group torchrun's environment describes; None when not launched.

    ``backend``: ``"auto"`` (nccl when CUDA is available, else gloo), ``"gloo"`` or ``"nccl"``.
    With nccl each process trains on ``cuda:<LOCAL_RANK>``. ``timeout_s`` bounds every
    collective, so a rank that died is noticed instead of waited for forever.
    """
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; choose one of {BACKENDS}")
    if not launched():
        return None
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(f"torch.distributed environment incomplete: {missing} not set")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    dp = DataParallel(sync_bn=sync_bn)
    log.info("data-parallel: %s", dp)
    return dp


def shutdown() -> None:
    """Leave the process group (every rank, at the end)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch(command: Sequence[str], nproc: int, *, master_addr: str = "127.0.0.1", master_port: int | None = None,
           env: dict | None = None, timeout_s: float | None = None, grace_s: float = 5.0,
           poll_s: float = 0.05) -> int:
    """Run ``nproc`` copies of ``command`` as ranks 0..N-1 of one job on this machine, the way
    ``torchrun --standalone`` does, and wait. Returns 0 when every rank exits 0, else the first
    failing rank's exit code (a signal ``k`` gives ``128 + k``); the moment one rank fails, the
    others get SIGTERM and, after ``grace_s``, SIGKILL. SIGINT/SIGTERM to the launcher are passed
    on. ``master_port`` None picks a free port on ``master_addr``. With ``timeout_s``, a job
    still running after that many seconds is stopped the same way and 124 is returned.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"launch: nproc must be a positive int, got {nproc!r}")
    command = [os.fspath(c) for c in command]
    if not command:
        raise ValueError("launch: empty command")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"launch: timeout_s must be > 0 or None, got {timeout_s!r}")
    port = master_port if master_port is not None else _free_port(master_addr)
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
    base.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default: N ranks share the cores
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(command, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          preexec_fn=_die_with_parent))
        failed = None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while failed is None:
            if deadline is not None and time.monotonic() > deadline:
                log.error("the job ran past %s s; stopping it", timeout_s)
                return 124
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is None and all(c == 0 for c in codes):
                return 0
            if failed is None:
                time.sleep(poll_s)
        log.error("a rank exited with %s; stopping the others", failed)
        return failed if failed > 0 else 128 - failed
    finally:
        _stop(procs, grace_s)
        for s, h in old.items():
            signal.signal(s, h)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

