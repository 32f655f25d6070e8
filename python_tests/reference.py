"""Pure-torch references, independent of the library's code paths (shared by the tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --- block ops -------------------------------------------------------------------------------
# Each block is computed from index_select'ed copies and a full-width masked formulation is
# avoided on purpose: the reference gathers explicit channel indices, so it shares no slicing
# code with slimkern.ops.

def _rows(blocks):
    if isinstance(blocks, torch.Tensor):
        return [tuple(int(v) for v in r) for r in blocks.tolist()]
    return [tuple(int(v) for v in r) for r in blocks]


def _offsets(rows, x_offsets):
    if x_offsets is not None:
        return [int(v) for v in (x_offsets.tolist() if isinstance(x_offsets, torch.Tensor) else x_offsets)]
    offs, acc = [], 0
    for i0, i1, _, _ in rows:
        offs.append(acc)
        acc += i1 - i0
    return offs


def ref_block_conv2d(x, weight, bias, blocks, x_offsets=None, stride=1, padding=0, dilation=1, depthwise=False):
    """cat_g conv2d(x[:, off_g + (0..in_g)], W[out_g, in_g], b[out_g]) along channels."""
    rows = _rows(blocks)
    outs = []
    for (i0, i1, o0, o1), off in zip(rows, _offsets(rows, x_offsets)):
        dev = x.device
        xg = x.index_select(1, torch.arange(off, off + i1 - i0, device=dev))
        wg = weight.index_select(0, torch.arange(o0, o1, device=dev))
        if not depthwise:
            wg = wg.index_select(1, torch.arange(i0, i1, device=dev))
        bg = None if bias is None else bias.index_select(0, torch.arange(o0, o1, device=dev))
        outs.append(F.conv2d(xg, wg, bg, stride, padding, dilation, groups=(i1 - i0) if depthwise else 1))
    return torch.cat(outs, dim=1)


def ref_block_linear(x, weight, bias, blocks, x_offsets=None):
    """cat_g x[:, off_g + (0..in_g)] @ W[out_g, in_g]^T + b[out_g] along features (einsum form)."""
    rows = _rows(blocks)
    outs = []
    for (i0, i1, o0, o1), off in zip(rows, _offsets(rows, x_offsets)):
        y = torch.einsum("ni,oi->no", x[:, off:off + i1 - i0], weight[o0:o1, i0:i1])
        if bias is not None:
            y = y + bias[o0:o1]
        outs.append(y)
    return torch.cat(outs, dim=1)


# --- switchable batch norm ----------------------------------------------------------------
def ref_switchable_batch_norm(x, weight, bias, running_mean, running_var, blocks, stat_rows, training,
                              momentum, eps, activation="none", num_batches_tracked=None):
    """Per block: F.batch_norm on its channel slice with its stats row (updated in place through
    the row view), then the activation; outputs concatenated. momentum=None follows
    nn.BatchNorm's cumulative average: each used row's counter += 1, factor 1 / counter."""
    blocks = [tuple(int(v) for v in b) for b in blocks]
    stat_rows = [int(r) for r in stat_rows]
    if training and num_batches_tracked is not None:
        for r in sorted(set(stat_rows)):
            num_batches_tracked[r] += 1
    outs, off = [], 0
    for (a, b), r in zip(blocks, stat_rows):
        xg = x[:, off:off + b - a]
        off += b - a
        m = momentum
        if training and momentum is None:
            m = 1.0 / float(num_batches_tracked[r])
        y = F.batch_norm(xg, running_mean[r, a:b], running_var[r, a:b],
                         None if weight is None else weight[a:b], None if bias is None else bias[a:b],
                         training, 0.0 if m is None else m, eps)
        if activation == "relu":
            y = F.relu(y)
        elif activation == "relu6":
            y = F.relu6(y)
        outs.append(y)
    return torch.cat(outs, 1)
