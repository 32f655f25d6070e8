"""Pure-torch versions of the block ops with the signatures of ``slimkern.ops``.

The modules call ``slimkern.ops.<name>`` when that op exists and these otherwise (see
``_ops.py``), so the nn layer works before/without the compiled kernels. They are also the
simplest statement of the semantics: per block, slice the weight, run the dense op, cat.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _offsets(blocks, x_offsets):
    if x_offsets is not None:
        return [int(o) for o in x_offsets]
    offs, at = [], 0
    for i0, i1, _, _ in blocks:
        offs.append(at)
        at += i1 - i0
    return offs


def _inputs(x, blocks, x_offsets):
    """Each block's input window; default packing uses split (cheap backward: one cat)."""
    if x_offsets is None and sum(i1 - i0 for i0, i1, _, _ in blocks) == x.shape[1]:
        return x.split([i1 - i0 for i0, i1, _, _ in blocks], 1)
    return [x[:, off:off + i1 - i0] for (i0, i1, _, _), off in zip(blocks, _offsets(blocks, x_offsets))]


def block_conv2d(x, weight, bias, blocks, x_offsets=None, stride=1, padding=0, dilation=1, depthwise=False):
    blocks = [tuple(int(v) for v in b) for b in blocks]
    outs = []
    for (i0, i1, o0, o1), xg in zip(blocks, _inputs(x, blocks, x_offsets)):
        if depthwise:
            w, groups = weight[o0:o1], o1 - o0
        else:
            w, groups = weight[o0:o1, i0:i1], 1
        b = bias[o0:o1] if bias is not None else None
        outs.append(F.conv2d(xg, w, b, stride, padding, dilation, groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def block_linear(x, weight, bias, blocks, x_offsets=None):
    blocks = [tuple(int(v) for v in b) for b in blocks]
    outs = []
    for (i0, i1, o0, o1), xg in zip(blocks, _inputs(x, blocks, x_offsets)):
        b = bias[o0:o1] if bias is not None else None
        outs.append(F.linear(xg, weight[o0:o1, i0:i1], b))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


_ACT = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6}


def switchable_batch_norm(x, weight, bias, running_mean, running_var, blocks, stat_rows, training,
                          momentum, eps, activation="none"):
    """Per block ``F.batch_norm`` on channel rows ``[start, stop)`` of the full affine and of
    statistics row ``stat_rows[g]``; running statistics are updated in place (views)."""
    outs = []
    blocks = [tuple(int(v) for v in b) for b in blocks]
    xs = x.split([e - s for s, e in blocks], 1)
    for (s, e), r, xg in zip(blocks, [int(r) for r in stat_rows], xs):
        rm = running_mean[r, s:e] if running_mean is not None else None
        rv = running_var[r, s:e] if running_var is not None else None
        w = weight[s:e] if weight is not None else None
        b = bias[s:e] if bias is not None else None
        outs.append(_ACT[activation](F.batch_norm(xg, rm, rv, w, b, training, 0.0 if momentum is None else momentum, eps)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)
