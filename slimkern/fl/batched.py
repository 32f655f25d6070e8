"""Client-batched local training: the clients of a round that run the same switches train as one.

In a federated round every client of a tier runs the same local recipe -- the same switch
(so the same channel windows of every layer), epochs, batch size and optimiser -- on its
own data and its own copy of the weights. ``ClientBatcher`` trains K such clients in one
pass per local step instead of K passes:

* **weights** are stacked, ``W[k]`` = client k's copy (one flat ``[K, P]`` tensor, viewed
  per parameter), and every sliced layer runs all clients at once: a convolution of the
  window ``W[k][out_b, in_b]`` is one grouped ``F.conv2d`` with ``groups = K`` (the
  clients' inputs stacked along channels, ``[N, K*C_in, H, W]``), a linear layer one
  ``torch.bmm``. The activations between layers are ``[K*N, C, ...]`` (client-major), so
  the net's own ``forward`` and every per-sample module (ReLU, pooling, flatten, HeteroFL's
  Scaler hooks) run unchanged; the packed multi-switch pass (``forward_switches``, ParaDiS
  nested training with in-place distillation) too.
* **batch norm** normalises with each client's own batch statistics (training mode), over
  its valid rows only: with ``m[k, i]`` = 1 for a real sample and 0 for padding,
  ``mu_kc = sum_i,s m_ki x_kics / (n_k S)``, ``var_kc = sum_i,s m_ki (x_kics - mu_kc)^2 / (n_k S)``
  (S spatial positions), ``y = (x - mu) / sqrt(var + eps) * gamma_k + beta_k``. Running
  statistics are not kept: in training mode they never enter the output, and in the
  federated protocol they never travel (rules whose statistics travel -- FjORD
  ``bn="travel"`` -- are not batched).
* **batches** are the ones the sequential client draws, in the same generator order
  (``slimkern.fl.client.local_batches`` is shared: per epoch a permutation, per step the
  rule's switches and the augmentation). Clients with fewer samples have fewer or smaller
  steps: step t of every client that has one runs together, padded to the largest batch of
  that step, and the loss of client k is ``L_k = sum_i m_ki l_ki / n_k`` (its own mean);
  the backward pass of ``sum_k L_k`` gives each client exactly its own gradient.
* **twin blocks** of a packed pass -- blocks that read the same windows in every layer, as
  ``[0.5]`` and the first branch of ``[0.5, 0.5]`` do when a ParaDiS client trains both --
  compute the same values in training mode (same input, batch statistics), so they are
  computed once and each switch's fused output sums its own blocks from them.
* **augmentation**: ``RandomAffine`` draws stay where the client draws them (its generator,
  its order); the warps of all the round's batches run as one call (each image depends on its
  own draws only). Any other augmentation is called per batch, as the client does.
* **SGD** is ``torch.optim.SGD``'s update per client, element-wise the same operations:
  ``d = g + wd * w``, ``b = mu * b + d`` (``b = d`` on the first step), ``w = w - lr * b``;
  gradient clipping (HeteroFL) scales each client's gradient by
  ``min(1, c / (||g_k|| + 1e-6))`` as ``clip_grad_norm_`` does.

The result equals the sequential client's (``train_task``) to float rounding: the order of
the sums inside a grouped convolution and a masked mean differs from the per-client
kernels, nothing else (``python_tests/test_fl_batched_clients.py`` compares the weights of
every client after a round, and the aggregate, to 1e-5).

What is not batched (``unsupported_reason`` says why, and ``simulate`` then trains those
clients one by one): a rule whose client hooks are not the known ones (a custom
``train_logits``, ``local_context``, ``step_switches`` ...), travelling BN statistics,
modules that are not known to act per sample (dropout with p > 0, a BN that is not a
switchable one, forward hooks), a net whose forward mixes samples (checked once per switch
set against the net's own forward), clients with a single sample, and a group of one client.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkern.fl import fingerprint as _fp
from slimkern.fl import rolex as _rolex
from slimkern.fl import validate as _validate
from slimkern.fl.aggregate import Aggregator, ClientUpdate
from slimkern.fl.client import (Task, client_aggregator, client_generators, client_indices, local_batches,
                                received)

__all__ = ["ClientBatcher", "unsupported_reason"]

def _known_hooks() -> dict[str, tuple]:
    from slimkern.fl.heterofl_local import HeteroFLRecipe
    from slimkern.fl.rules.base import Rule
    from slimkern.fl.rules.fjord import FjORD
    from slimkern.fl.rules.paradis import ParaDiSFL
    return {"step_switches": (Rule.step_switches, ParaDiSFL.step_switches, FjORD.step_switches),
            "step_switch": (Rule.step_switch, FjORD.step_switch),
            "train_logits": (Rule.train_logits, HeteroFLRecipe.train_logits),
            "local_context": (Rule.local_context, HeteroFLRecipe.local_context)}


def unsupported_reason(model: nn.Module, rule) -> str | None:
    """Why the clients of ``rule`` on ``model`` cannot be trained batched to the sequential
    result (one sentence), or None when they can (module docstring)."""
    from slimkern.nn import SlimConv2d, SlimLinear
    from slimkern.nn.batchnorm import _SwitchableBatchNorm
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for hook, known in _known_hooks().items():
        if hook in vars(rule):
            return f"rule {type(rule).__name__} sets its own client hook {hook!r} on the instance"
        fn = getattr(type(rule), hook, None)
        if fn is not None and fn not in known:
            return f"rule {type(rule).__name__} has a custom client hook {hook!r} (only the built-in ones are batched)"
    if getattr(rule, "bn_travel", False):
        return f"rule {type(rule).__name__} sends BN statistics back (bn='travel'): they are per-client running state"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            return f"parameter {name!r} is frozen (requires_grad=False)"
        if not p.is_floating_point():
            return f"parameter {name!r} is not floating point"
    for name, m in model.named_modules():
        label = f"module {name or '(root)'!r} ({type(m).__name__})"
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None):
            return f"{label} has hooks"
        if isinstance(m, (SlimConv2d, SlimLinear)):
            if type(m) not in (SlimConv2d, SlimLinear):
                return f"{label} subclasses a slim layer"
            continue
        if isinstance(m, _SwitchableBatchNorm):
            if getattr(m, "process_group", None) is not None:
                return f"{label} synchronises its statistics over processes"
            continue
        if isinstance(m, nn.Dropout) and type(m) is nn.Dropout:
            if m.p > 0:
                return f"{label} draws random masks (p={m.p}): batched clients would draw other ones"
            continue
        if not list(m.parameters(recurse=False)) and not list(m.buffers(recurse=False)):
            continue  # parameter-free (activations, pooling, containers, the root): the one-time
            # check of the batched pass against the net's own forward tells whether it acts per sample
        return f"{label} holds its own parameters or buffers but is not a slimkern layer"
    return None


# -- the layers, client-batched ----------------------------------------------------------------

class _Layout:
    """The batch of one batched pass: ``k`` clients x ``n`` rows (padded), ``mask`` ``[k, n]``
    (None when nobody is padded) and ``count`` ``[k]`` real rows per client."""
    __slots__ = ("k", "n", "mask", "count", "keep", "pos")

    def __init__(self):
        self.k, self.n, self.mask, self.count = 1, 0, None, None
        self.keep, self.pos = None, None  # the distinct blocks of the plan (``ClientBatcher._distinct``)


def _tables(m, lay: "_Layout") -> dict:
    """The layer's block table for this pass, restricted to the plan's distinct blocks
    (``lay.keep``): duplicated blocks are computed once and re-used where fused."""
    _, t = m._sk_current()
    if lay.keep is None:
        return dict(t, pos=list(range(len(t["blocks"]))))
    t = dict(t, blocks=[t["blocks"][g] for g in lay.keep], pos=lay.pos)
    if t.get("x_offsets") is not None:
        t["x_offsets"] = [t["x_offsets"][g] for g in lay.keep]
    return t


def _nhwc(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[K*N, C, H, W]`` (any memory format) -> a ``[K, N, H, W, C]`` view or copy."""
    n = x.shape[0] // k
    return x.permute(0, 2, 3, 1).reshape(k, n, x.shape[2], x.shape[3], x.shape[1])


def _from_nhwc(y: torch.Tensor) -> torch.Tensor:
    """``[N, Ho, Wo, K, C]`` -> ``[K*N, C, Ho, Wo]`` in channels-last memory (one copy)."""
    n, ho, wo, k, c = y.shape
    return y.permute(3, 0, 1, 2, 4).reshape(k * n, ho, wo, c).permute(0, 3, 1, 2)


def _grouped(x5: torch.Tensor) -> torch.Tensor:
    """``[K, N, H, W, C]`` -> ``[N, K*C, H, W]`` channels-last: the clients along channels
    for one grouped convolution (channels-last: oneDNN's grouped kernels run 1-2x faster on
    these small maps than in NCHW, measured)."""
    k, n, h, w, c = x5.shape
    return x5.permute(1, 2, 3, 0, 4).reshape(n, h, w, k * c).permute(0, 3, 1, 2)


class _Windows(torch.autograd.Function):
    """``cat([w[(slice(None),) + win] for win in windows], 1)``: the windows (index tuples on
    the dims after the first) of a stacked weight ``w`` ``[K, ...]``, concatenated along dim 1.
    Its backward allocates one zero gradient and adds each window's gradient into its place
    (slicing each window under autograd would zero-fill one full-size gradient per window)."""

    @staticmethod
    def forward(ctx, w, windows):
        ctx.windows, ctx.shape = windows, w.shape
        parts = [w[(slice(None),) + win] for win in windows]
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, g):
        gw = g.new_zeros(ctx.shape)
        at = 0
        for win in ctx.windows:
            view = gw[(slice(None),) + win]
            view += g[:, at:at + view.shape[1]]
            at += view.shape[1]
        return gw, None


def _gather(w: torch.Tensor, blocks, depthwise: bool) -> torch.Tensor:
    """The windows of ``blocks`` of a stacked conv weight ``w`` ``[K, out, in, kh, kw]``
    concatenated along the output channels (``_Windows``)."""
    wins = tuple((slice(o0, o1),) if depthwise else (slice(o0, o1), slice(i0, i1)) for i0, i1, o0, o1 in blocks)
    return _Windows.apply(w, wins)


def _runs(blocks, offsets) -> list[tuple[int, int]]:
    """Consecutive blocks ``[g0, g1)`` of equal shape whose inputs follow each other in the
    packed input: one grouped convolution computes a run."""
    runs: list[list[int]] = []
    for g, (i0, i1, o0, o1) in enumerate(blocks):
        if runs:
            j0, j1, p0, p1 = blocks[g - 1]
            if (j1 - j0, p1 - p0) == (i1 - i0, o1 - o0) and offsets[g] == offsets[g - 1] + (j1 - j0):
                runs[-1][1] = g + 1
                continue
        runs.append([g, g + 1])
    return [(a, b) for a, b in runs]


def _out_size(hw, m) -> tuple[int, ...]:
    return tuple((s + 2 * p - d * (kk - 1) - 1) // st + 1
                 for s, p, d, kk, st in zip(hw, m.padding, m.dilation, m.kernel_size, m.stride))


def _assemble(parts: list[torch.Tensor], bias, t, bias_cols):
    """Per block ``[N, *sp, K, C_b]`` -> the layer's output. ``blocks`` mode: packed along
    channels (+ each block's bias); ``fuse``: per switch the sum of its blocks plus the bias
    once, the switches stacked along the batch. Returns ``[N, *sp, K, C]`` tensors per
    switch (fuse) or one (blocks)."""
    if t["mode"] == "fuse":
        outs = []
        pos = t["pos"]
        for g0, g1 in t["segments"]:
            z = parts[pos[g0]]
            for g in range(g0 + 1, g1):
                z = z + parts[pos[g]]
            outs.append(z if bias is None else z + bias)
        return outs
    if bias is not None:
        parts = [q + bias[:, o0:o1] for q, (o0, o1) in zip(parts, bias_cols)]
    return [parts[0] if len(parts) == 1 else torch.cat(parts, -1)]


def _conv_forward(m, lay: "_Layout", x: torch.Tensor) -> torch.Tensor:
    t = _tables(m, lay)
    k, w, b = lay.k, m.weight, m.bias  # w: [K, C_out, C_in/groups, kh, kw], b: [K, C_out]
    n = x.shape[0] // k
    ho, wo = _out_size(x.shape[2:], m)

    def conv(x5, wg, groups):  # [K, N, H, W, C_in'] x [K, C_out', ...] -> [N, Ho, Wo, K, C_out']
        y = F.conv2d(_grouped(x5), wg.reshape(-1, *wg.shape[2:]), None, m.stride, m.padding, m.dilation, groups)
        return y.permute(0, 2, 3, 1).reshape(n, ho, wo, k, wg.shape[1])

    if t["mode"] == "plain":
        y = conv(_nhwc(x, k), w, k * m.groups)
        return _from_nhwc(y if b is None else y + b)
    blocks = t["blocks"]
    outs_cols = [(o0, o1) for _, _, o0, o1 in blocks]
    if not x.requires_grad and not m.depthwise and t["x_offsets"] is not None:
        # every block reads the whole input (the image, no gradient): one im2col, one bmm
        ws = _gather(w, blocks, False)  # [K, sum C_out, C_in, kh, kw]
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # [K*N, C_in*kh*kw, L]
        cols = cols.view(k, n, cols.shape[1], -1).transpose(2, 3).reshape(k, n * ho * wo, -1)
        y = torch.bmm(cols, ws.reshape(k, ws.shape[1], -1).transpose(1, 2)).view(k, n, ho, wo, -1)
        if t["mode"] == "blocks" and b is None:  # the packed output is y itself
            return y.reshape(k * n, ho, wo, -1).permute(0, 3, 1, 2)
        y = y.permute(1, 2, 3, 0, 4)
        parts = list(y.split([o1 - o0 for o0, o1 in outs_cols], -1))
    else:
        from slimkern.nn._fallback import _offsets
        offs = _offsets(blocks, t["x_offsets"])
        x5 = _nhwc(x, k)
        parts = []
        for g0, g1 in _runs(blocks, offs):
            i0, i1, o0, o1 = blocks[g0]
            r = g1 - g0
            xg = x5[..., offs[g0]:offs[g0] + (r * (o1 - o0) if m.depthwise else r * (i1 - i0))]
            groups = k * r * (o1 - o0) if m.depthwise else k * r
            parts += list(conv(xg, _gather(w, blocks[g0:g1], m.depthwise), groups).split(o1 - o0, -1))
    outs = _assemble(parts, b, t, outs_cols)
    if t["mode"] == "fuse":
        return torch.cat([_from_nhwc(o) for o in outs], 0)
    return _from_nhwc(outs[0])


def _linear_forward(m, lay: "_Layout", x: torch.Tensor) -> torch.Tensor:
    t = _tables(m, lay)
    k, w, b = lay.k, m.weight, m.bias  # w: [K, out, in], b: [K, out]
    n = x.shape[0] // k
    xk = x.reshape(k, n, -1)

    def lin(xg, wg):  # -> [N, K, out']
        return torch.bmm(xg, wg.transpose(1, 2)).transpose(0, 1)

    if t["mode"] == "plain":
        y = lin(xk, w)
        outs = [y if b is None else y + b]
    else:
        from slimkern.nn._fallback import _offsets
        offs = _offsets(t["blocks"], t["x_offsets"])
        parts = [lin(xk[..., off:off + i1 - i0], w[:, o0:o1, i0:i1])
                 for (i0, i1, o0, o1), off in zip(t["blocks"], offs)]
        outs = _assemble(parts, b, t, [(o0, o1) for _, _, o0, o1 in t["blocks"]])
    return torch.cat([o.transpose(0, 1).reshape(k * n, -1) for o in outs], 0)



class _MaskedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm + activation per (client, channel) over a client's real rows.

    ``xs`` ``[K, N, S, C]`` (S spatial positions), ``mask`` ``[K, N, 1, 1]`` (1: a real row;
    None: all real), ``cnt`` ``[K, 1, 1, 1]`` = real rows x S. Forward:
    ``mu = sum m x / cnt``, ``var = sum m (x - mu)^2 / cnt``, ``xh = (x - mu) / sqrt(var + eps)``,
    ``y = act(w xh + b)``. Backward with ``g = dL/d(w xh + b)`` (zero on padded rows: their
    loss is masked): ``db = sum g``, ``dw = sum g xh``,
    ``dx = m / sqrt(var + eps) * (w g - w db / cnt - xh w dw / cnt)`` -- the textbook BN
    gradient with the means over real rows, which the sums over all rows already are since
    ``g`` vanishes on padding. One autograd node instead of a dozen elementwise ones."""

    @staticmethod
    def forward(ctx, xs, w, b, mask, cnt, eps, activation):
        if mask is None:
            var, mean = torch.var_mean(xs, (1, 2), correction=0, keepdim=True)
        else:
            mean = (xs.sum(2, keepdim=True) * mask).sum(1, keepdim=True) / cnt
            var = ((xs - mean).square().sum(2, keepdim=True) * mask).sum(1, keepdim=True) / cnt
        rstd = torch.rsqrt(var + eps)
        scale = rstd if w is None else rstd * w
        shift = -mean * scale if b is None else b - mean * scale
        y = torch.addcmul(shift, xs, scale)  # w (x - mu) rstd + b in one pass
        if activation == "relu":
            y.relu_()
        elif activation == "relu6":
            y.clamp_(0.0, 6.0)
        ctx.save_for_backward(xs, mean, rstd, w, mask, cnt, y if activation != "none" else None)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, mean, rstd, w, mask, cnt, y = ctx.saved_tensors
        g = gy
        if ctx.activation == "relu":
            g = torch.ops.aten.threshold_backward(gy, y, 0.0)
        elif ctx.activation == "relu6":
            g = torch.ops.aten.hardtanh_backward(gy, y, 0.0, 6.0)
        xh = torch.addcmul(-mean * rstd, xs, rstd)
        db = g.sum((1, 2), keepdim=True)
        dw = (g * xh).sum((1, 2), keepdim=True)
        a = rstd if w is None else rstd * w
        if mask is not None:
            a = a * mask  # [K, N, 1, C]: padded rows get no gradient
        dx = (g - torch.addcmul(db / cnt, xh, dw / cnt)) * a
        if w is None:
            return dx, None, None, None, None, None, None
        return dx, dw, db, None, None, None, None


def _bn_forward(m, lay: "_Layout", x: torch.Tensor) -> torch.Tensor:
    """Training-mode switchable BN with each client's batch statistics over its real rows."""
    t = _tables(m, lay)
    k = lay.k
    n, c = x.shape[0] // k, x.shape[1]
    if x.dim() == 2:
        xs, back = x.view(k, n, 1, c), (lambda y: y.view(k * n, c))
    else:  # [K, N, S, C]: channels last, the layout the batched convolutions produce
        hw = x.shape[2:]
        xs = x.permute(0, *range(2, x.dim()), 1).reshape(k, n, -1, c)
        back = (lambda y: y.reshape(k * n, *hw, c).permute(0, x.dim() - 1, *range(1, x.dim() - 1)))
    if m.weight is not None:
        wins = tuple((slice(s, e),) for s, e in t["blocks"])
        wb, bb = _Windows.apply(m.weight, wins).view(k, 1, 1, c), _Windows.apply(m.bias, wins).view(k, 1, 1, c)
    else:
        wb = bb = None
    if lay.mask is None:
        mask, cnt = None, torch.full((k, 1, 1, 1), float(n * xs.shape[2]), dtype=xs.dtype)
    else:
        mask, cnt = lay.mask.view(k, n, 1, 1), (lay.count * xs.shape[2]).view(k, 1, 1, 1)
    y = _MaskedBatchNorm.apply(xs, wb, bb, mask, cnt, float(m.eps), m.activation)
    return back(y)


def _chunks(members: list[int], sizes: list[int], pass_rows: int, max_rows: int | None = None) -> list[list[int]]:
    """Splits the clients of one step into passes, each padded to its largest batch: the
    split minimising ``sum over passes (pass_rows + clients x largest batch)`` (padded rows
    cost like real ones; ``pass_rows`` is a pass's fixed cost in rows), each pass at most
    ``max_rows`` padded rows (a single client always fits). Exact by dynamic programming over
    the clients sorted by batch size (some optimal split is contiguous in that order)."""
    order = sorted(range(len(members)), key=lambda j: -sizes[j])
    sz = [sizes[j] for j in order]
    best, cut = [0.0] + [math.inf] * len(sz), [0] * (len(sz) + 1)
    for j in range(1, len(sz) + 1):
        for i in range(j):
            if max_rows is not None and j - i > 1 and (j - i) * sz[i] > max_rows:
                continue
            c = best[i] + pass_rows + (j - i) * sz[i]
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], len(sz)
    while j > 0:
        out.append(sorted(members[order[q]] for q in range(cut[j], j)))
        j = cut[j]
    return out[::-1]


def _drawn(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for ``RandomAffine`` in ``local_batches``: the images and their draws, taken
    from the client's generator exactly where the augmentation would take them."""
    from slimkern.fl.augment import RandomAffine
    return x, RandomAffine.draw(len(x), generator)


def _global_rng(augment) -> bool:
    """Whether ``augment`` may draw from torch's global generator (anything but None and
    ``RandomAffine``, which draws from the generator it is given only)."""
    from slimkern.fl.augment import RandomAffine
    return augment is not None and type(augment) is not RandomAffine


class _Packed(nn.Module):
    """``forward_switches`` of the wrapped net as a module (for ``torch.func.functional_call``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, switches):
        from slimkern.nn import forward_switches
        return forward_switches(self.net, x, list(switches))


# -- the trainer -------------------------------------------------------------------------------

class ClientBatcher:
    """Trains the tasks of a round in client batches (module docstring).

    ``ClientBatcher(model, rule)`` raises ValueError with ``unsupported_reason`` when the
    rule or the net cannot be batched. ``train(tasks, X, Y, indices, augment)`` returns
    ``(replies, rest)``: ``replies`` maps a client id to its ``ClientUpdate`` (or to the
    exception that stopped its training: a ``ClientFailure`` for a non-finite loss), ``rest``
    lists the tasks to train one by one (clients with one sample, groups of one, groups whose
    switches the net's forward check refused: ``reasons`` then says why).

    ``pass_rows``: the fixed cost of a pass in padded rows, for splitting a step's clients
    into passes by batch size (64 measured best of 16/32/64/128/unsplit on the demo at 100
    clients, within noise of 32 and 128). ``max_rows``: at most this many padded rows in one
    pass (memory: a pass holds the activations of all its clients; None: no bound).
    """

    def __init__(self, model: nn.Module, rule, agg: Aggregator | None = None, pass_rows: int = 64,
                 max_rows: int | None = None):
        from slimkern.nn import SlimConv2d, SlimLinear
        from slimkern.nn.batchnorm import _SwitchableBatchNorm
        why = unsupported_reason(model, rule)
        if why is not None:
            raise ValueError(f"clients cannot be batched: {why}")
        self.rule = rule
        self.model = model
        self.net = copy.deepcopy(model).train()
        self.layout = _Layout()
        for m in self.net.modules():
            if isinstance(m, SlimConv2d):
                m.forward = functools.partial(_conv_forward, m, self.layout)
            elif isinstance(m, SlimLinear):
                m.forward = functools.partial(_linear_forward, m, self.layout)
            elif isinstance(m, _SwitchableBatchNorm):
                m.forward = functools.partial(_bn_forward, m, self.layout)
        self.packed = _Packed(self.net)
        self.agg = agg or client_aggregator(self.net)
        self.shapes = dict(self.agg.shapes)
        self.base = self.agg.flatten(dict(self.net.named_parameters()))
        self._checked: dict[tuple, str | None] = {}
        self._twins: dict[tuple, tuple] = {}
        self.reasons: list[str] = []
        if isinstance(pass_rows, bool) or not isinstance(pass_rows, int) or pass_rows < 0:
            raise ValueError(f"pass_rows must be an int >= 0, got {pass_rows!r}")
        self.pass_rows = pass_rows
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        self.max_rows = max_rows

    # -- one batched pass -----------------------------------------------------------------
    def _forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, switches) -> list[torch.Tensor]:
        """Per switch ``[K, N, classes]`` logits of the K clients whose stacked weights are
        ``params`` (name -> ``[K, *shape]``) on inputs ``x`` ``[K, N, ...]`` (``self.layout`` set)."""
        k, n = x.shape[0], x.shape[1]
        self.layout.k, self.layout.n = k, n
        self.layout.keep, self.layout.pos = self._distinct(tuple(switches))
        outs = torch.func.functional_call(self.packed, {f"net.{name}": v for name, v in params.items()},
                                          (x.reshape(k * n, *x.shape[2:]), tuple(switches)))
        return [o.reshape(k, n, *o.shape[1:]) for o in outs]

    def _distinct(self, switches: tuple):
        """``(keep, pos)``: the blocks of the packed pass of ``switches`` that differ, and for
        every block the position of its twin among them (None, None: no twins). Two blocks
        are twins when every layer reads the same windows for both (``[0.5]`` and the first
        branch of ``[0.5, 0.5]``): they read the same input, and with training-mode BN (batch
        statistics) they compute the same values up to the fused layer, where each switch
        sums its own blocks. Only for nets whose sliced layers all run on packed blocks and
        end in one fused layer (otherwise None, None)."""
        if switches in self._twins:
            return self._twins[switches]
        from slimkern.nn import slim_modules
        from slimkern.nn.plan import Plan
        plan = Plan(list(switches))
        tabs, fused = [], 0
        for _, mod in slim_modules(self.net):
            t = mod._sk_prepare(plan)
            mode = t.get("mode", "blocks")
            fused += mode == "fuse"
            if mode == "plain":
                fused = 2
                break
            tabs.append([tuple(b) for b in t["blocks"]])
        res = (None, None)
        if fused == 1:
            keep: list[int] = []
            pos: list[int] = []
            for g in range(len(plan.blocks)):
                twin = next((j for j, h in enumerate(keep) if all(tab[h] == tab[g] for tab in tabs)), None)
                if twin is None:
                    keep.append(g)
                    twin = len(keep) - 1
                pos.append(twin)
            if len(keep) < len(plan.blocks):
                res = (keep, pos)
        self._twins[switches] = res
        return res

    def _stacked(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[K, P]`` flat parameters -> name -> ``[K, *shape]`` (contiguous copies)."""
        return {name: flat[:, o:o + math.prod(s)].reshape(flat.shape[0], *s).contiguous()
                for (name, s), o in zip(self.shapes.items(), self.agg.offsets.values())}

    def _check(self, switches, sample: torch.Tensor) -> str | None:
        """Once per switch set: the batched pass of two clients (different weights, different
        inputs) equals the net's own forward of each (None), else why not."""
        key = tuple(switches)
        if key in self._checked:
            return self._checked[key]
        from slimkern.nn import forward_switches
        g = torch.Generator().manual_seed(0)
        flat = torch.stack([self.base, self.base * (1 + 0.1 * torch.randn(self.base.shape, generator=g))])
        x = sample[:1].repeat(2, 3, *([1] * (sample.dim() - 1)))
        x = x + 0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        ref = copy.deepcopy(self.model).train()
        why = None
        with torch.no_grad():
            self.layout.mask = self.layout.count = None
            try:
                got = self._forward(self._stacked(flat), x, switches)
            except Exception as exc:  # noqa: BLE001 - the batched pass cannot run this net: one by one
                self._checked[key] = f"the batched pass fails at {[str(w) for w in switches]}: {exc}"
                return self._checked[key]
            for kk in range(2):
                for name, t in self.agg.unflatten(flat[kk]).items():
                    ref.get_parameter(name).copy_(t)
                want = forward_switches(ref, x[kk], list(switches))
                for s, (a, b) in enumerate(zip(got, want)):
                    err = float((a[kk] - b).abs().max())
                    if not err <= 1e-4 * (1 + float(b.abs().max())):
                        why = (f"the net's forward at {[str(w) for w in switches]} differs batched (max error "
                               f"{err:.3g}): it mixes samples or runs modules the batched pass does not know")
                        break
        self._checked[key] = why
        return why

    # -- a round ----------------------------------------------------------------------------
    def train(self, tasks: Sequence[Task], X: torch.Tensor, Y: torch.Tensor, indices: Mapping[int, Any],
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
              ) -> tuple[dict[int, ClientUpdate | BaseException], list[Task]]:
        """Trains ``tasks`` (client ``task.client`` on ``X[indices[client]]``); see the class."""
        groups: dict[tuple, list[Task]] = {}
        rest: list[Task] = []
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError(f"tasks must be slimkern.fl.client.Task, got {type(task).__name__}")
            if task.rule is not self.rule:
                raise ValueError(f"task of client {task.client} runs another rule than this batcher's")
            idx = client_indices(task, indices[task.client], len(X))
            if len(idx) < 2:
                rest.append(task)
                continue
            key = (_rolex.train_switch(task.key), float(task.lr), float(task.momentum), float(task.weight_decay))
            groups.setdefault(key, []).append(task)
        replies: dict[int, ClientUpdate | BaseException] = {}
        self.reasons = []
        for (sw, lr, mom, wd), group in groups.items():
            if len(group) < 2:
                rest.extend(group)
                continue
            done = self._train_group(group, sw, lr, mom, wd, X, Y, indices, augment)
            if done is None:
                rest.extend(group)
            else:
                replies.update(done)
        return replies, rest

    def _train_group(self, group, sw, lr, mom, wd, X, Y, indices, augment):
        rule = self.rule
        out: dict[int, ClientUpdate | BaseException] = {}
        steps: list[list] = []
        from slimkern.fl.augment import RandomAffine
        affine = type(augment) is RandomAffine  # draws now (the client's generator order), warps later
        flats = []
        for task in group:
            c = int(task.client)
            try:
                idx = client_indices(task, indices[c], len(X))
                flat = received(self.agg, self.base, task)
                gen, pyrng = client_generators(task)
                # the sequential client forks torch's global generator for the client; only an
                # augmentation of unknown kind could draw from it here (no dropout is batched)
                fork = _fp.client_rng(int(task.seed), int(task.round), c) if _global_rng(augment) \
                    else contextlib.nullcontext()
                with fork:
                    steps.append([(tuple(s), xb, yb) for s, xb, yb in local_batches(
                        X, Y, idx, task.key, rule, task.local_epochs, task.batch_size, gen, pyrng,
                        _drawn if affine else augment)])
                flats.append(flat)
            except Exception as exc:  # noqa: BLE001 - a client whose task fails is dropped with the reason
                out[c] = exc
                steps.append(None)
                flats.append(None)
        live = [i for i, s in enumerate(steps) if s is not None]
        if not live:
            return out
        if affine:  # every step's images warped in one call, each with its own client's draws
            batches = [st for i in live for st in steps[i]]
            warped = augment.warp(torch.cat([st[1][0] for st in batches]), torch.cat([st[1][1] for st in batches]))
            warped = iter(warped.split([len(st[2]) for st in batches]))
            for i in live:
                steps[i] = [(sws, next(warped), yb) for sws, _, yb in steps[i]]
        for sws in dict.fromkeys(st[0] for i in live for st in steps[i]):
            why = self._check(sws, next(st[1] for i in live for st in steps[i] if st[0] == sws))
            if why is not None:  # trained one by one instead (``reasons`` says why)
                self.reasons.append(why)
                return None
        # row j of every stacked tensor = client group[live[j]]
        params = self._stacked(torch.stack([flats[i] for i in live]))
        bufs = {name: torch.zeros_like(v) for name, v in params.items()}
        row = {i: j for j, i in enumerate(live)}
        clip = getattr(rule, "clip_norm", None)
        base_logits = type(rule).train_logits is _known_hooks()["train_logits"][0]
        failed: set[int] = set()
        local = rule.local_context(self.net, sw)
        with local:
            for t in range(max(len(steps[i]) for i in live)):
                active = [i for i in live if i not in failed and t < len(steps[i])]
                by_sws: dict[tuple, list[int]] = {}
                for i in active:
                    by_sws.setdefault(steps[i][t][0], []).append(i)
                for sws, same in by_sws.items():
                    for members in _chunks(same, [len(steps[i][t][2]) for i in same], self.pass_rows,
                                           self.max_rows):
                                self._step(members, t, sws, steps, group, params, bufs, row, lr, mom, wd, clip,
                                       base_logits, failed, out)
        flat = torch.cat([v.reshape(len(live), -1) for v in params.values()], 1)
        for i in live:
            task = group[i]
            if i in failed:
                continue
            c = int(task.client)
            n = float(len(client_indices(task, indices[c], len(X))))
            out[c] = ClientUpdate(c, task.key, _rolex.from_local(self.agg, flat[row[i]], task.key), n)
        return out

    def _step(self, members, t, sws, steps, group, params, bufs, row, lr, mom, wd, clip, base_logits, failed, out):
        """One local SGD step of the clients ``members`` (all at step ``t``, same switches)."""
        k = len(members)
        whole = k == next(iter(params.values())).shape[0]
        rows = None if whole else torch.tensor([row[i] for i in members])
        xs = [steps[i][t][1] for i in members]
        ys = [steps[i][t][2] for i in members]
        counts = [len(v) for v in ys]
        n = max(counts)
        if min(counts) == n:
            x, y, mask, cnt = torch.stack(xs), torch.stack(ys), None, None
        else:  # padded to the largest batch; the mask keeps padding out of BN statistics and losses
            x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
            y = torch.nn.utils.rnn.pad_sequence(ys, batch_first=True)
            cnt = torch.tensor(counts, dtype=x.dtype)
            mask = (torch.arange(n, dtype=x.dtype) < cnt.unsqueeze(1)).to(x.dtype)
        self.layout.mask, self.layout.count = mask, cnt
        leaves = {name: (v if whole else v.index_select(0, rows)).detach().requires_grad_(True)
                  for name, v in params.items()}
        outs = self._forward(leaves, x, sws)
        if not base_logits:
            outs = [torch.stack([self.rule.train_logits(o[j], group[i].key) for j, i in enumerate(members)])
                    for o in outs]
        ncls = outs[0].shape[-1]

        def mean_rows(v):  # each client's mean over its real rows
            return v.mean(1) if mask is None else (v * mask).sum(1) / cnt

        loss = mean_rows(F.cross_entropy(outs[0].reshape(k * n, ncls), y.reshape(-1), reduction="none").view(k, n))
        if len(outs) > 1:  # in-place distillation from the client's own switch, as local_train
            soft = F.softmax(outs[0].detach(), dim=-1).reshape(k * n, ncls)
            for o in outs[1:]:
                loss = loss + mean_rows(F.cross_entropy(o.reshape(k * n, ncls), soft, reduction="none").view(k, n))
        ok = torch.isfinite(loss.detach())
        if not bool(ok.all()):
            for j in torch.nonzero(~ok).flatten().tolist():
                i = members[j]
                failed.add(i)
                out[int(group[i].client)] = _validate.ClientFailure(
                    f"the local loss is not finite ({float(loss[j].detach())})")
            loss = torch.where(ok, loss, torch.zeros_like(loss))
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        with torch.no_grad():
            if clip is not None:  # clip_grad_norm_ per client: the norm of the per-parameter norms
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), dim=1) for g in grads]), dim=0)
                coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
                grads = [g * coef.view(k, *([1] * (g.dim() - 1))) for g in grads]
            for (name, p), g in zip(leaves.items(), grads):  # torch.optim.SGD's update, element for element
                d = g.add(p, alpha=wd)
                bf = (bufs[name] if whole else bufs[name].index_select(0, rows)).mul_(mom).add_(d)
                new = p.detach().add_(bf, alpha=-lr)
                if not whole:
                    params[name].index_copy_(0, rows, new)
                    bufs[name].index_copy_(0, rows, bf)
