r"""Switchable batch norm with batch statistics synchronised over the ranks of a process group.

Data-parallel training splits a global batch of :math:`B = \sum_r B_r` samples over ranks. A BN
layer in training mode normalises with its batch's mean and variance, so with per-rank
statistics a rank with :math:`B_r = 32` computes a different function than one process with
:math:`B = 64` (the "ghost batch" effect), and its running statistics rows drift apart from the
other ranks'. Here every packed channel ``p`` (block ``g``, full channel ``c``, see
``slimkern.ops.switchable_batch_norm``) uses the statistics of the *global* batch:

.. math::
    M = \sum_r N_r \prod \mathrm{spatial},\qquad
    \mu_p = \frac{1}{M}\,\mathrm{AllReduce}_r\Big(\sum_{n,hw} x_r[n,p,hw]\Big),\qquad
    \sigma^2_p = \frac{1}{M}\,\mathrm{AllReduce}_r\Big(\sum_{n,hw} (x_r[n,p,hw]-\mu_p)^2\Big)

    y = \mathrm{act}\big(w_c\,(x - \mu_p)/\sqrt{\sigma^2_p + \epsilon} + b_c\big)

(two passes, as the single-process kernel, rather than :math:`E[x^2]-E[x]^2`, which cancels
badly in float32). The running rows are updated with :math:`\mu_p` and the unbiased
:math:`\sigma^2_p M/(M-1)`, identically on every rank, so the rows stay equal across ranks
without any broadcast. The all-reduces are differentiable (:class:`_AllReduceSum`): the
backward all-reduces the gradients of the sums, so
rank ``r``'s input gradient is that of :math:`\sum_{r'} \mathcal{L}_{r'}` — the gradient of the
batch-``B`` loss once the parameter gradients are averaged (Ioffe & Szegedy 2015's BN backward
over the whole batch; ``torch.nn.SyncBatchNorm`` does the same for plain BN).

Cost: two all-reduces of ``[P]`` floats per BN layer forward and two in the backward; the
normalisation runs as pure torch ops (the fused C++/Triton kernels compute their own
statistics, so they are not used while synchronised). Evaluation mode is unchanged.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["sync_switchable_batch_norm", "synchronised_batch_norm"]


def sync_switchable_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                               running_mean: torch.Tensor, running_var: torch.Tensor, blocks, stat_rows,
                               training: bool, momentum: float | None, eps: float, activation: str = "none",
                               *, group=None, num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """``slimkern.ops.switchable_batch_norm`` with the global batch's statistics (module docstring).

    Same arguments as the op, plus ``group`` (the process group; None: the default group).
    ``momentum=None`` (cumulative average) needs ``num_batches_tracked``, already incremented
    for this call, as the module does. In eval mode this is the op itself.
    """
    import torch.distributed as dist

    from slimkern.nn._ops import op

    # the module (slimkern.ops re-exports the function under the same name)
    sbn = importlib.import_module("slimkern.ops.switchable_batch_norm")

    if not training:
        return op("switchable_batch_norm")(x, weight, bias, running_mean, running_var, blocks, stat_rows, False,
                                           momentum, eps, activation)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_switchable_batch_norm needs an initialised torch.distributed process group")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if activation not in sbn.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sbn.ACTIVATIONS}, got {activation!r}")
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    flat, rows = sbn._flat_blocks(blocks), sbn._flat_rows(stat_rows)
    sbn._validate(x, weight, bias, running_mean, running_var, flat, rows, True)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = x.new_full((1,), float(x.numel() // x.shape[1]))
    # [sum_p ..., count]: the count rides along so ranks with different batch sizes still agree.
    summed = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
    total = summed[-1].detach()
    mean = summed[:-1] / total
    centred = x - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims), group) / total
    y = centred * torch.rsqrt(var + eps).view(shape)
    # packed channel -> full channel, for the shared affine parameters
    index = torch.cat([torch.arange(flat[2 * g], flat[2 * g + 1], device=x.device) for g in range(len(rows))])
    if weight is not None:
        y = y * weight.index_select(0, index).view(shape)
    if bias is not None:
        y = y + bias.index_select(0, index).view(shape)
    y = sbn._act_torch(y, activation)
    m = int(total.item())
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel over all ranks when training, got {m}")
    sbn._update_stats_torch(running_mean, running_var, None, mean.detach(), var.detach(), flat, rows, m,
                            momentum if momentum is not None else _cumulative(num_batches_tracked, rows))
    return y


class _AllReduceSum(torch.autograd.Function):
    r""":math:`s = \sum_r t_r` on every rank; backward :math:`\partial t_r = \sum_{r'} \partial s_{r'}`,
    since every rank's loss depends on :math:`s` (as ``torch.distributed.nn.functional.all_reduce``,
    which torch deprecates without a differentiable successor)."""

    @staticmethod
    def forward(ctx, t, group):
        import torch.distributed as dist

        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _cumulative(num_batches_tracked: torch.Tensor, rows: list[int]) -> float:
    counts = {int(num_batches_tracked[r]) for r in rows}
    if len(counts) != 1:  # the module splits such calls per switch; every row here has one count
        raise ValueError(f"cumulative average over rows with different counts {sorted(counts)}")
    return 1.0 / counts.pop()


@contextlib.contextmanager
def synchronised_batch_norm(net: nn.Module, group=None) -> Iterator[nn.Module]:
    """Within the block, every switchable BN layer of ``net`` in training mode normalises with
    the statistics of the batch over all ranks of ``group`` (None: the default group).

    Sets each layer's ``process_group`` (read by its forward) and clears it on exit, so nothing
    outlives the block: calibration and evaluation on one rank afterwards never wait for the
    others.
    """
    from slimkern.nn.batchnorm import _SwitchableBatchNorm

    if not isinstance(net, nn.Module):
        raise TypeError(f"synchronised_batch_norm: net must be an nn.Module, got {type(net).__name__}")
    bns = [m for m in net.modules() if isinstance(m, _SwitchableBatchNorm)]
    for m in bns:
        m.process_group = group if group is not None else _default_group()
    try:
        yield net
    finally:
        for m in bns:
            m.process_group = None


def _default_group():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("synchronised_batch_norm needs an initialised torch.distributed process group")
    return dist.group.WORLD
