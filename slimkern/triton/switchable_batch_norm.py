"""Triton kernels of switchable batch norm (see slimkern.ops.switchable_batch_norm for the math).

One program per packed channel for the reductions (shifted one-pass sums in float32, the
shift being the channel's first value so the sums do not cancel), element-wise programs for
the fused normalise + affine + activation and for the input gradient. Used on CUDA tensors,
and on CPU tensors under TRITON_INTERPRET=1 in the tests. The forward and backward are
torch.library custom ops (``slimkern::switchable_batch_norm_triton_forward/_backward``) with
the same fake kernels and autograd formula as the C++ ops; the running-statistics update
of this backend is the torch one in slimkern.ops.switchable_batch_norm.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

# The package attribute is the public function; the module itself holds the shared helpers.
_sbn = importlib.import_module("slimkern.ops.switchable_batch_norm")

_ACT = {"none": 0, "relu": 1, "relu6": 2}
_REDUCE_BLOCK = 1024
_ELEM_BLOCK = 1024


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    return z


@triton.jit
def _mask_grad(z, d, ACT: tl.constexpr):
    if ACT == 1:
        d = tl.where(z > 0.0, d, 0.0)
    elif ACT == 2:
        d = tl.where((z > 0.0) & (z < 6.0), d, 0.0)
    return d


@triton.jit
def _affine(mean, var, c, w_ptr, b_ptr, ws, bs, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    inv = 1.0 / tl.sqrt(var + eps)
    scale = inv
    if HAS_W:
        scale = tl.load(w_ptr + c * ws).to(tl.float32) * inv
    shift = -mean * scale
    if HAS_B:
        shift = tl.load(b_ptr + c * bs).to(tl.float32) + shift
    return inv, scale, shift


@triton.jit
def _stats_kernel(x_ptr, chan_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, coef_ptr, N, Cp, HW,
                  rm0, rm1, rv0, rv1, ws, bs, eps, TRAINING: tl.constexpr, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    c = tl.load(chan_ptr + p)
    r = tl.load(chan_ptr + Cp + p)
    if TRAINING:
        M = N * HW
        K = tl.load(x_ptr + p * HW).to(tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        q = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            ok = idx < M
            n = idx // HW
            hw = idx - n * HW
            v = tl.load(x_ptr + (n * Cp + p) * HW + hw, mask=ok, other=0.0).to(tl.float32)
            v = tl.where(ok, v - K, 0.0)
            s += v
            q += v * v
        m = tl.sum(s, axis=0) / M
        mean = K + m
        var = tl.maximum(tl.sum(q, axis=0) / M - m * m, 0.0)
    else:
        mean = tl.load(rm_ptr + r * rm0 + c * rm1).to(tl.float32)
        var = tl.load(rv_ptr + r * rv0 + c * rv1).to(tl.float32)
    inv, scale, shift = _affine(mean, var, c, w_ptr, b_ptr, ws, bs, eps, HAS_W, HAS_B)
    tl.store(mean_ptr + p, mean)
    tl.store(var_ptr + p, var)
    tl.store(coef_ptr + 2 * p, scale)
    tl.store(coef_ptr + 2 * p + 1, shift)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, coef_ptr, total, Cp, HW, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    p = (offs // HW) % Cp
    scale = tl.load(coef_ptr + 2 * p, mask=ok, other=0.0)
    shift = tl.load(coef_ptr + 2 * p + 1, mask=ok, other=0.0)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = _activate(x * scale + shift, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_reduce_kernel(dy_ptr, x_ptr, chan_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, gw_ptr, gb_ptr, coef_ptr, N, Cp,
                        HW, ws, bs, eps, TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        ACT: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    c = tl.load(chan_ptr + p)
    mean = tl.load(mean_ptr + p)
    var = tl.load(var_ptr + p)
    inv, scale, shift = _affine(mean, var, c, w_ptr, b_ptr, ws, bs, eps, HAS_W, HAS_B)
    M = N * HW
    sg = tl.zeros([BLOCK], dtype=tl.float32)
    sgx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < M
        n = idx // HW
        hw = idx - n * HW
        off = (n * Cp + p) * HW + hw
        x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        g = _mask_grad(x * scale + shift, d, ACT)
        sg += g
        sgx += tl.where(ok, g * (x - mean), 0.0)
    SG = tl.sum(sg, axis=0)
    SGX = tl.sum(sgx, axis=0)
    tl.store(gw_ptr + p, SGX * inv)
    tl.store(gb_ptr + p, SG)
    k1 = 0.0
    k0 = 0.0
    if TRAINING:
        k1 = -scale * inv * inv * SGX / M
        k0 = -scale * SG / M
    tl.store(coef_ptr + 4 * p, scale)
    tl.store(coef_ptr + 4 * p + 1, shift)
    tl.store(coef_ptr + 4 * p + 2, k1)
    tl.store(coef_ptr + 4 * p + 3, k0)


@triton.jit
def _grad_x_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, coef_ptr, total, Cp, HW, ACT: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    p = (offs // HW) % Cp
    scale = tl.load(coef_ptr + 4 * p, mask=ok, other=0.0)
    shift = tl.load(coef_ptr + 4 * p + 1, mask=ok, other=0.0)
    k1 = tl.load(coef_ptr + 4 * p + 2, mask=ok, other=0.0)
    k0 = tl.load(coef_ptr + 4 * p + 3, mask=ok, other=0.0)
    mean = tl.load(mean_ptr + p, mask=ok, other=0.0)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = _mask_grad(x * scale + shift, d, ACT)
    dx = scale * g + k1 * (x - mean) + k0
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _channel_table(blocks: List[int], stat_rows: Optional[List[int]], device) -> torch.Tensor:
    full, rows = [], []
    for g in range(len(blocks) // 2):
        a, b = blocks[2 * g], blocks[2 * g + 1]
        full += range(a, b)
        rows += [stat_rows[g] if stat_rows is not None else 0] * (b - a)
    return torch.tensor([full, rows], dtype=torch.int64, device=device)


def _hw(x: torch.Tensor) -> int:
    return x[0, 0].numel() if x.shape[0] > 0 and x.shape[1] > 0 else int(torch.tensor(x.shape[2:]).prod())


def _param(t: Optional[torch.Tensor], x: torch.Tensor):
    return (t, t.stride(0), True) if t is not None else (x, 0, False)


@torch.library.custom_op("slimkern::switchable_batch_norm_triton_forward", mutates_args=())
def forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               running_mean: torch.Tensor, running_var: torch.Tensor, blocks: List[int], stat_rows: List[int],
               training: bool, eps: float, activation: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    N, Cp, HW = x.shape[0], x.shape[1], _hw(x)
    y = torch.empty_like(x)
    mean = x.new_empty(Cp, dtype=torch.float32)
    var = x.new_empty(Cp, dtype=torch.float32)
    coef = x.new_empty(2 * Cp, dtype=torch.float32)
    chan = _channel_table(blocks, stat_rows, x.device)
    w, ws, has_w = _param(weight, x)
    b, bs, has_b = _param(bias, x)
    _stats_kernel[(Cp,)](x, chan, w, b, running_mean, running_var, mean, var, coef, N, Cp, HW,
                         running_mean.stride(0), running_mean.stride(1), running_var.stride(0),
                         running_var.stride(1), ws, bs, eps, TRAINING=training, HAS_W=has_w, HAS_B=has_b,
                         BLOCK=_REDUCE_BLOCK)
    total = x.numel()
    if total:
        _apply_kernel[(triton.cdiv(total, _ELEM_BLOCK),)](x, y, coef, total, Cp, HW, ACT=_ACT[activation],
                                                          BLOCK=_ELEM_BLOCK)
    return y, mean, var


@torch.library.custom_op("slimkern::switchable_batch_norm_triton_backward", mutates_args=())
def backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                save_mean: torch.Tensor, save_var: torch.Tensor, blocks: List[int], num_channels: int,
                training: bool, eps: float, activation: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    dy = grad_y.contiguous()
    N, Cp, HW = x.shape[0], x.shape[1], _hw(x)
    dx = torch.empty_like(x)
    gwp = x.new_empty(Cp, dtype=torch.float32)
    gbp = x.new_empty(Cp, dtype=torch.float32)
    coef = x.new_empty(4 * Cp, dtype=torch.float32)
    chan = _channel_table(blocks, None, x.device)
    w, ws, has_w = _param(weight, x)
    b, bs, has_b = _param(bias, x)
    act = _ACT[activation]
    _grad_reduce_kernel[(Cp,)](dy, x, chan, w, b, save_mean.contiguous(), save_var.contiguous(), gwp, gbp, coef, N,
                               Cp, HW, ws, bs, eps, TRAINING=training, HAS_W=has_w, HAS_B=has_b, ACT=act,
                               BLOCK=_REDUCE_BLOCK)
    total = x.numel()
    if total:
        _grad_x_kernel[(triton.cdiv(total, _ELEM_BLOCK),)](dy, x, dx, save_mean.contiguous(), coef, total, Cp, HW,
                                                           ACT=act, BLOCK=_ELEM_BLOCK)
    gw = torch.zeros(num_channels, dtype=torch.float32, device=x.device).index_add_(0, chan[0], gwp)
    gb = torch.zeros(num_channels, dtype=torch.float32, device=x.device).index_add_(0, chan[0], gbp)
    return dx, gw.to(x.dtype), gb.to(x.dtype)


forward_op.register_fake(_sbn._fake_forward)
backward_op.register_fake(_sbn._fake_backward)
forward_op.register_autograd(_sbn._make_backward(backward_op), setup_context=_sbn._setup_context)
