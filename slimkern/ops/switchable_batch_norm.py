"""Switchable batch norm: one fused op for the BN layers of a packed multi-switch pass.

Slimmable networks (Yu et al., "Slimmable Neural Networks", ICLR 2019) share convolution
weights across widths but keep *private* BN statistics per width, because the mean and
variance of a channel change with the number of active channels feeding it. ParaDiS
(Ozerov et al.) does the same per switch, with every branch of a switch normalising its own
channel range. Here the affine parameters ``weight``/``bias`` ``[C_full]`` are shared and the
running statistics are rows of ``[S, C_full]`` buffers, one row per switch.

The activations of G blocks are packed along channels (``x`` is ``[N, sum_g C_g, *spatial]``).
Block g covers channels ``[a_g, b_g)`` of the full layer (``blocks[g] = (a_g, b_g)``) and
statistics row ``r_g = stat_rows[g]``. For a packed channel p of block g, full channel c:

    training:  mu_p = mean_{n,hw} x[n,p,hw],  var_p = mean_{n,hw} (x[n,p,hw] - mu_p)^2 (biased)
    eval:      mu_p = running_mean[r_g, c],   var_p = running_var[r_g, c]
    y[n,p,hw]  = act( weight[c] * (x[n,p,hw] - mu_p) / sqrt(var_p + eps) + bias[c] )

with ``act`` in {"none", "relu", "relu6"} fused into the same pass (and its derivative into
the backward, which masks the gradient where the pre-activation is <= 0, or >= 6 for relu6,
exactly as ``F.relu``/``F.relu6`` do). Training also updates the rows in place, as
``torch.nn.BatchNorm`` does, with the *unbiased* variance (M = N * prod(spatial) values):

    f = momentum                 (or 1 / num_batches_tracked[r_g] when momentum is None)
    running_mean[r_g, c] <- (1 - f) * running_mean[r_g, c] + f * mu_p
    running_var[r_g, c]  <- (1 - f) * running_var[r_g, c]  + f * var_p * M / (M - 1)

``num_batches_tracked`` (optional int64 ``[S]``) is the per-row batch counter: every row that
some block uses is incremented once per training call (blocks of one ParaDiS switch share a
row but not channels). ``momentum=None`` is the cumulative moving average used for BN
calibration and needs the counter. Two blocks that update the *same channels of the same
row* in one training call are refused (the result would depend on their order and the
batch would be counted twice); in eval mode blocks may overlap freely. An empty batch in
training (N = 0 or an empty spatial dim) returns an empty output and leaves the rows as they are,
counting the batch in ``num_batches_tracked``, as ``nn.BatchNorm`` does.

Gradients: the standard BN backward per packed channel (training: through the batch
statistics; eval: the affine map only), with ``grad_weight``/``grad_bias`` summed over every
block that uses a channel, since the affine parameters are shared.

Backends: CPU tensors run the C++ kernels; CUDA tensors run Triton when it is installed, else
the C++ CUDA kernels; ``backend="torch"`` is a pure-torch path (per-block ``var_mean``,
autograd by torch) that needs no compiled code. Double backward is not supported by the
fused backends. Every argument is validated before anything is computed or written.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from slimkern import _library
from slimkern.ops._blocks import _has_kernel, as_index, int_tensor_list

__all__ = ["switchable_batch_norm", "not_supported_reasons", "ACTIVATIONS", "BACKENDS"]

ACTIVATIONS = ("none", "relu", "relu6")
BACKENDS = ("cpp", "triton", "torch")
_OP = "switchable_batch_norm"


def _flat_blocks(blocks) -> list[int]:
    if hasattr(blocks, "__array__") and not isinstance(blocks, torch.Tensor):  # numpy
        blocks = torch.as_tensor(blocks)
    if isinstance(blocks, torch.Tensor):
        values = int_tensor_list(blocks, "blocks")
        if blocks.dim() != 2 or blocks.shape[1] != 2:
            raise ValueError(f"blocks must be a [G, 2] tensor of (start, stop) channel ranges, got shape "
                             f"{tuple(blocks.shape)}")
        return [v for row in values for v in row]
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(f"blocks must be a [G, 2] int tensor or a list of (start, stop) pairs, got "
                        f"{type(blocks).__name__}")
    flat = []
    for g, pair in enumerate(blocks):
        if isinstance(pair, torch.Tensor) or hasattr(pair, "__array__"):
            pair = int_tensor_list(torch.as_tensor(pair), f"blocks[{g}]")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"blocks[{g}] must be a (start, stop) pair, got {pair!r}")
        flat += [as_index(v, f"blocks[{g}] entry") for v in pair]
    return flat


def _flat_rows(stat_rows) -> list[int]:
    if isinstance(stat_rows, int):
        raise TypeError("stat_rows must be a sequence (one row per block) or a [G] tensor, got an int")
    if hasattr(stat_rows, "__array__") and not isinstance(stat_rows, torch.Tensor):  # numpy
        stat_rows = torch.as_tensor(stat_rows)
    if isinstance(stat_rows, torch.Tensor):
        if stat_rows.dtype.is_floating_point or stat_rows.dtype == torch.bool or stat_rows.dim() != 1:
            raise TypeError(f"stat_rows must be a 1-d integer tensor, got dtype {stat_rows.dtype} and shape "
                            f"{tuple(stat_rows.shape)}")
        return [int(v) for v in stat_rows.tolist()]
    return [as_index(v, f"stat_rows[{g}]") for g, v in enumerate(stat_rows)]


def _check_int64(values, what: str) -> None:
    """The op schema takes int64 lists; a Python int beyond them is out of every range anyway."""
    for k, v in enumerate(values):
        if not -(2**63) <= v < 2**63:
            raise ValueError(f"{what}: entry {k} = {v} is outside the int64 range (and out of range for the layer)")


def _check_scalars(eps, momentum) -> tuple[float, float | None]:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:  # also refuses NaN
        raise ValueError(f"momentum must be in [0, 1] (or None for the cumulative average), got {momentum!r}")
    return float(eps), None if momentum is None else float(momentum)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def not_supported_reasons(x: torch.Tensor, backend: str) -> list[str]:
    """Why ``backend`` cannot run on ``x`` (empty list: it can), the xformers habit."""
    reasons = []
    if backend == "cpp":
        if not _library.has_op(_OP):
            reasons.append(f"the C++ extension is not loaded ({_library.LOAD_ERROR or 'op missing'})")
        elif x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
            reasons.append(f"the C++ CPU kernels support float32 and float64, got {x.dtype}")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"no C++ kernels for device {x.device.type}")
        elif x.device.type == "cuda" and not _has_kernel(_OP, "cuda"):
            reasons.append("slimkern was built without CUDA kernels")
    elif backend == "triton":
        if not _triton_available():
            reasons.append("triton is not installed")
        elif x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("Triton runs CPU tensors only under TRITON_INTERPRET=1")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"Triton does not run on device {x.device.type}")
        if x.dtype == torch.float64:
            reasons.append("the Triton kernels accumulate in float32; use float64 with backend='cpp'")
    elif backend != "torch":
        reasons.append(f"unknown backend {backend!r}; pick one of {BACKENDS}")
    return reasons


def _choose_backend(x: torch.Tensor, backend: str | None) -> str:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        reasons = not_supported_reasons(x, backend)
        if reasons:
            raise RuntimeError(f"backend {backend!r} cannot run this input: " + "; ".join(reasons))
        return backend
    order = ("triton", "cpp") if x.device.type == "cuda" else ("cpp",)
    for name in order:
        if not not_supported_reasons(x, name):
            return name
    return "torch"


def _check_num_batches(num_batches_tracked, momentum, running_mean) -> None:
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked, an int64 [S] "
                         "tensor of per-row batch counts")
    if momentum is not None and not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__}")
    if num_batches_tracked is None:
        return
    if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.dtype != torch.int64:
        raise TypeError("num_batches_tracked must be an int64 tensor")
    if num_batches_tracked.device != running_mean.device:
        raise RuntimeError(f"num_batches_tracked must be on running_mean's device {running_mean.device}, got "
                           f"{num_batches_tracked.device}")
    if running_mean.dim() == 2 and tuple(num_batches_tracked.shape) != (running_mean.shape[0],):
        raise ValueError(f"num_batches_tracked must be [{running_mean.shape[0]}] (one count per statistics row), "
                         f"got shape {tuple(num_batches_tracked.shape)}")


def _validate(x, weight, bias, running_mean, running_var, flat, rows, training) -> None:
    """The C++ checks, in Python, for the backends that have no C++ front door."""
    for name, t in (("x", x), ("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must be [N, C] or [N, C, *spatial] with up to 3 spatial dims, got shape "
                         f"{tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if running_mean.dim() != 2:
        raise ValueError(f"running_mean must be [S, C_full] (one row per statistics set), got shape "
                         f"{tuple(running_mean.shape)}")
    if running_var.shape != running_mean.shape:
        raise ValueError(f"running_var must have the shape of running_mean {tuple(running_mean.shape)}, got "
                         f"{tuple(running_var.shape)}")
    S, C = running_mean.shape
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device or t.dtype != x.dtype:
            raise RuntimeError(f"{name} and x must be on the same device with the same dtype, got "
                               f"{t.device}/{t.dtype} and {x.device}/{x.dtype}")
        if name in ("weight", "bias") and tuple(t.shape) != (C,):
            raise ValueError(f"{name} must be the full layer's [{C}] affine parameter (C_full from "
                             f"running_mean), got shape {tuple(t.shape)}")
    if len(flat) % 2 or not flat:
        raise ValueError("blocks is empty: at least one block (G >= 1) is required" if not flat else
                         f"blocks must have 2 entries per block (start, stop); got {len(flat)} numbers")
    G = len(flat) // 2
    if len(rows) != G:
        raise ValueError(f"stat_rows has {len(rows)} entries but there are {G} blocks")
    total = 0
    for g in range(G):
        a, b = flat[2 * g], flat[2 * g + 1]
        if not (0 <= a <= b <= C):
            raise ValueError(f"block {g}: channel range [{a}, {b}) is not inside the layer's {C} channels "
                             f"(or stop < start)")
        if a == b:
            raise ValueError(f"block {g} is empty: [{a}, {b})")
        if not 0 <= rows[g] < S:
            raise ValueError(f"stat_rows[{g}] = {rows[g]} is out of range for {S} statistics rows")
        total += b - a
    if x.shape[1] != total:
        raise ValueError(f"x has {x.shape[1]} channels but the blocks hold {total}: x's channel count does not "
                         f"match the blocks")
    if training:
        if x.numel() // max(x.shape[1], 1) == 1:  # an empty batch is allowed (see below)
            raise ValueError(f"Expected more than 1 value per channel when training, got x of shape "
                             f"{tuple(x.shape)}")
        for g in range(G):
            for h in range(g + 1, G):
                lo = max(flat[2 * g], flat[2 * h])
                hi = min(flat[2 * g + 1], flat[2 * h + 1])
                if rows[g] == rows[h] and lo < hi:
                    raise ValueError(f"blocks {g} and {h} both update channels [{lo}, {hi}) of stat row {rows[g]} "
                                     f"in one training call; give them different stat_rows or use separate calls")


# --------------------------------------------------------------------------- pure torch

def _act_torch(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "relu6":
        return F.relu6(y)
    return y


def _forward_torch(x, weight, bias, running_mean, running_var, flat, rows, training, eps, activation):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    outs, means, variances = [], [], []
    off = 0
    for g, r in enumerate(rows):
        a, b = flat[2 * g], flat[2 * g + 1]
        xg = x[:, off:off + b - a]
        off += b - a
        if training:
            var, mean = torch.var_mean(xg, dim=dims, correction=0)
        else:
            mean, var = running_mean[r, a:b], running_var[r, a:b]
        y = (xg - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
        if weight is not None:
            y = y * weight[a:b].view(shape)
        if bias is not None:
            y = y + bias[a:b].view(shape)
        outs.append(_act_torch(y, activation))
        means.append(mean.detach())
        variances.append(var.detach())
    return torch.cat(outs, 1), torch.cat(means), torch.cat(variances)


@torch.no_grad()
def _update_stats_torch(running_mean, running_var, num_batches_tracked, save_mean, save_var, flat, rows, count,
                        momentum):
    """The running-statistics update of the C++ op, with torch ops (Triton and torch backends)."""
    if num_batches_tracked is not None:
        used = torch.tensor(sorted(set(rows)), device=num_batches_tracked.device)
        num_batches_tracked.index_add_(0, used, torch.ones_like(used))
    off = 0
    for g, r in enumerate(rows):
        a, b = flat[2 * g], flat[2 * g + 1]
        m = save_mean[off:off + b - a].to(running_mean.dtype)
        v = save_var[off:off + b - a].to(running_var.dtype) * (count / (count - 1))
        off += b - a
        f = momentum if momentum is not None else 1.0 / num_batches_tracked[r].to(running_mean.dtype)
        running_mean[r, a:b] = (1 - f) * running_mean[r, a:b] + f * m
        running_var[r, a:b] = (1 - f) * running_var[r, a:b] + f * v


# --------------------------------------------------------------------------- op registrations

def _fake_forward(x, weight, bias, running_mean, running_var, blocks, stat_rows, training, eps, activation):
    torch._check(len(blocks) == 2 * len(stat_rows), lambda: "blocks and stat_rows disagree on G")
    torch._check(x.shape[1] == sum(blocks[1::2]) - sum(blocks[0::2]),
                 lambda: "x's channel count does not match the blocks")
    cp = x.shape[1]
    sd = _stat_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(cp, dtype=sd),
            x.new_empty(cp, dtype=sd))


def _fake_backward(grad_y, x, weight, bias, save_mean, save_var, blocks, num_channels, training, eps, activation):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(num_channels),
            x.new_empty(num_channels))


def _setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, _rv, blocks, _rows, training, eps, activation = inputs
    _y, save_mean, save_var = output
    ctx.save_for_backward(x, weight, bias, save_mean, save_var)
    ctx.blocks, ctx.num_channels = blocks, running_mean.shape[1]
    ctx.training, ctx.eps, ctx.activation = training, eps, activation
    ctx.mark_non_differentiable(save_mean, save_var)


def _make_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, save_mean, save_var = ctx.saved_tensors
        gx, gw, gb = backward_op(grad_y, x, weight, bias, save_mean, save_var, ctx.blocks, ctx.num_channels,
                                 ctx.training, ctx.eps, ctx.activation)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if weight is not None and need[1] else None,
                gb if bias is not None and need[2] else None, None, None, None, None, None, None, None)

    return backward


if _library.has_op(_OP):
    torch.library.register_fake("slimkern::switchable_batch_norm")(_fake_forward)
    torch.library.register_fake("slimkern::switchable_batch_norm_backward")(_fake_backward)

    @torch.library.register_fake("slimkern::switchable_batch_norm_update_stats_")
    def _fake_update(running_mean, running_var, num_batches_tracked, save_mean, save_var, blocks, stat_rows, count,
                     momentum):
        return None

    torch.library.register_autograd("slimkern::switchable_batch_norm",
                                    _make_backward(torch.ops.slimkern.switchable_batch_norm_backward),
                                    setup_context=_setup_context)


def _triton_ops():
    from slimkern.triton import switchable_batch_norm as tsbn  # needs triton; defines the Triton ops

    return tsbn.forward_op, tsbn.backward_op


# --------------------------------------------------------------------------- public function

def switchable_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    blocks: torch.Tensor | Sequence[Sequence[int]],
    stat_rows: torch.Tensor | Sequence[int],
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str = "none",
    backend: str | None = None,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm (+ fused activation) of packed blocks with per-block statistics rows.

    Args:
        x: packed activations ``[N, sum_g C_g]`` or ``[N, sum_g C_g, *spatial]``.
        weight, bias: the shared full affine parameters ``[C_full]`` or None (identity).
        running_mean, running_var: ``[S, C_full]`` statistics, one row per switch; updated
            in place when ``training``.
        blocks: ``[G, 2]`` int tensor or list of ``(start, stop)`` channel ranges of the layer.
        stat_rows: ``[G]`` the statistics row each block uses.
        training: batch statistics + running update (True) or the rows (False).
        momentum: running-average factor, or None for the cumulative average (needs
            ``num_batches_tracked``).
        eps: added to the variance.
        activation: "none", "relu" or "relu6", fused forward and backward.
        backend: None (CPU: C++; CUDA: Triton, else C++), "cpp", "triton" or "torch".
        num_batches_tracked: optional int64 ``[S]`` per-row batch counter, incremented in
            place once per training call for every row used.

    Returns:
        ``y`` with x's shape (contiguous), blocks in x's order. See the module docstring
        for the math.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    flat, rows = _flat_blocks(blocks), _flat_rows(stat_rows)
    _check_int64(flat, "blocks")
    _check_int64(rows, "stat_rows")
    training = bool(training)
    if training:
        _check_num_batches(num_batches_tracked, momentum, running_mean)
    eps, momentum = _check_scalars(eps, momentum)
    name = _choose_backend(x, backend)
    empty_batch = training and x.numel() == 0 and x.dim() >= 2 and x.shape[1] > 0
    if name != "cpp" or empty_batch:
        _validate(x, weight, bias, running_mean, running_var, flat, rows, training)
    if empty_batch:
        # As nn.BatchNorm: an empty batch gives an empty output, carries no statistics (the
        # running rows stay) and is still counted in num_batches_tracked.
        if num_batches_tracked is not None:
            with torch.no_grad():
                for r in sorted(set(rows)):
                    num_batches_tracked[r] += 1
        return _forward_torch(x, weight, bias, running_mean, running_var, flat, rows, False, eps, activation)[0]
    if name == "torch":
        y, mean, var = _forward_torch(x, weight, bias, running_mean, running_var, flat, rows, training, eps,
                                      activation)
        update = _update_stats_torch
    else:
        if name == "cpp":
            forward = torch.ops.slimkern.switchable_batch_norm
            update = torch.ops.slimkern.switchable_batch_norm_update_stats_
        else:
            forward, _ = _triton_ops()
            update = _update_stats_torch
        y, mean, var = forward(x, weight, bias, running_mean, running_var, flat, rows, training, eps, activation)
    if training:
        update(running_mean, running_var, num_batches_tracked, mean, var, flat, rows, x.numel() // x.shape[1],
               momentum)
    return y
