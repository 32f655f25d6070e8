r"""Triton kernels of ``slimkern.ops.block_conv2d`` (forward and the three gradients).

For block :math:`g` with weight ranges :math:`[i_0, i_1) \times [o_0, o_1)`, input offset
:math:`a_g` and output offset :math:`b_g` (the blocks' outputs packed in order)

.. math::
    y[n, b_g + c, p, q] = \beta[o_0 + c] + \sum_{k < i_1 - i_0} \sum_{r, s}
        x[n, a_g + k, p s_h - \pi_h + r d_h, q s_w - \pi_w + s d_w]\, W[o_0 + c, i_0 + k, r, s]

(depthwise: :math:`k = c` and the weight's input index is 0). The kernels read ``W``, ``x``
and ``grad_out`` through their strides: the weight slice is never copied.

* dense forward: implicit GEMM, :math:`M = N H_o W_o` rows (pixels), one column per output
  channel of the block, reduction over :math:`K = C_{in} k_h k_w` gathered on the fly;
* dense grad_x: the same GEMM on the transposed convolution (rows are input pixels,
  the reduction runs over (output channel, tap) with the stride's divisibility as a mask);
* dense grad_w: a GEMM whose reduction runs over the :math:`N H_o W_o` pixels, split
  across programs (split-K) and added atomically into a float32 buffer;
* depthwise: direct kernels (one lane per element) for forward and grad_x, and a
  [taps x pixels] reduction per channel for grad_w;
* grad_bias: a per-channel sum of grad_out.

Gradients accumulate in float32 buffers across blocks, so overlapping blocks (1.0x and 0.5x
reading ``W[:C/2, :C/2]``) and blocks that share input channels add up, then the result
is cast back to the inputs' dtype. float32 products use TF32 tensor cores only when torch
allows it for convolutions (``torch.backends.cudnn.allow_tf32``), like ``F.conv2d``.
"""
from __future__ import annotations

import contextlib

from typing import Sequence

import torch
import triton
import triton.language as tl

from slimkern.triton._blocks import (
    BlockRun, check_tensors, interpreting, mask_of, next_pow2, not_supported_reasons, num_sms, pair,
    parse_blocks,
)

__all__ = ["forward", "backward", "not_supported_reasons"]


# ----------------------------------------------------------------------------- index helpers
@triton.jit
def _unravel(i, H, W):
    """``i = (a * H + h) * W + w`` -> ``(a, h, w)``: a weight column (channel, kh, kw), say."""
    t = i // W
    return t // H, t % H, i % W


@triton.jit
def _unravel_pixel(i, H, W):
    """Pixel index ``i = (n * H + h) * W + w`` -> ``(n, h, w)``, n as int64 for the pointer math."""
    n, h, w = _unravel(i, H, W)
    return n.to(tl.int64), h, w


@triton.jit
def _tap_in(o, k, stride, pad, dil, size):
    """The input coordinate that output coordinate ``o`` reads through tap ``k``, and whether
    it lies inside ``[0, size)`` (outside: padding)."""
    i = o * stride - pad + k * dil
    return i, (i >= 0) & (i < size)


@triton.jit
def _tap_out(i, k, stride, pad, dil, size):
    """The output coordinate that reads input coordinate ``i`` through tap ``k``, and whether
    one does (on the stride grid, inside ``[0, size)``). Negatives are clamped before dividing
    so the stride test never depends on how negative numbers round."""
    t = i + pad - k * dil
    tc = tl.where(t >= 0, t, 0)
    o = tc // stride
    return o, (t >= 0) & (tc % stride == 0) & (o < size)


# ----------------------------------------------------------------------------- dense kernels
@triton.jit
def _fwd_dense_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww, sb,
    syn, syc, syh, syw,
    in_start, in_size, out_start, out_size, x_off, y_off,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < out_size
    n, oh, ow = _unravel_pixel(offs_m, Ho, Wo)
    K = in_size * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ci, kh, kw = _unravel(offs_k, KH, KW)
        ih, h_ok = _tap_in(oh[:, None], kh[None, :], sh, ph, dh, H)
        iw, w_ok = _tap_in(ow[:, None], kw[None, :], sw, pw, dw, W)
        a_mask = m_mask[:, None] & k_mask[None, :] & h_ok & w_ok
        a = tl.load(x_ptr + n[:, None] * sxn + (x_off + ci)[None, :] * sxc + ih * sxh + iw * sxw,
                    mask=a_mask, other=0.0)
        b = tl.load(w_ptr + (out_start + offs_n)[None, :] * swo + (in_start + ci)[:, None] * swi
                    + kh[:, None] * swh + kw[:, None] * sww,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + (out_start + offs_n) * sb, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + n[:, None] * syn + (y_off + offs_n)[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grad_x_dense_kernel(
    go_ptr, w_ptr, gx_ptr,
    M, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    swo, swi, swh, sww,
    gxn, gxc, gxh, gxw,
    in_start, in_size, out_start, out_size, x_off, y_off,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Rows: input pixels (n, ih, iw); columns: the block's input channels; reduction over
    # (output channel, tap). gx is a float32 buffer owned by this call: load-add-store is
    # race-free because each element belongs to one program, and launches run in order.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < in_size
    n, ih, iw = _unravel_pixel(offs_m, H, W)
    K = out_size * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        co, kh, kw = _unravel(offs_k, KH, KW)
        oh, h_ok = _tap_out(ih[:, None], kh[None, :], sh, ph, dh, Ho)
        ow, w_ok = _tap_out(iw[:, None], kw[None, :], sw, pw, dw, Wo)
        a_mask = m_mask[:, None] & k_mask[None, :] & h_ok & w_ok
        a = tl.load(go_ptr + n[:, None] * sgn + (y_off + co)[None, :] * sgc + oh * sgh + ow * sgw,
                    mask=a_mask, other=0.0)
        b = tl.load(w_ptr + (out_start + co)[:, None] * swo + (in_start + offs_n)[None, :] * swi
                    + kh[:, None] * swh + kw[:, None] * sww,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PREC)
    gx_ptrs = gx_ptr + n[:, None] * gxn + (x_off + offs_n)[None, :] * gxc + (ih * gxh + iw * gxw)[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(gx_ptrs, tl.load(gx_ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _grad_w_dense_kernel(
    go_ptr, x_ptr, gw_ptr,
    P, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    gwo, gwi, gwh, gww,
    in_start, in_size, out_start, out_size, x_off, y_off,
    sh, sw, ph, pw, dh, dw, k_per_split,
    KH: tl.constexpr, KW: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Rows: the block's output channels; columns: (input channel, tap); reduction over the
    # pixels (n, oh, ow), split into k_per_split-long pieces added atomically.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < out_size
    n_mask = offs_n < in_size * KH * KW
    ci, kh, kw = _unravel(offs_n, KH, KW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = (offs_k < P) & (offs_k < k_begin + k_per_split)
        n, oh, ow = _unravel_pixel(offs_k, Ho, Wo)
        a = tl.load(go_ptr + (y_off + offs_m)[:, None] * sgc + (n * sgn + oh * sgh + ow * sgw)[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        ih, h_ok = _tap_in(oh[:, None], kh[None, :], sh, ph, dh, H)
        iw, w_ok = _tap_in(ow[:, None], kw[None, :], sw, pw, dw, W)
        b_mask = k_mask[:, None] & n_mask[None, :] & h_ok & w_ok
        b = tl.load(x_ptr + n[:, None] * sxn + (x_off + ci)[None, :] * sxc + ih * sxh + iw * sxw,
                    mask=b_mask, other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PREC)
    gw_ptrs = gw_ptr + (out_start + offs_m)[:, None] * gwo + ((in_start + ci) * gwi + kh * gwh + kw * gww)[None, :]
    tl.atomic_add(gw_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------- depthwise kernels
@triton.jit
def _fwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    total, C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    swo, swh, sww, sb,
    syn, syc, syh, syw,
    start, x_off, y_off,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    ow = offs % Wo
    t = offs // Wo
    oh = t % Ho
    t = t // Ho
    c = t % C
    n = (t // C).to(tl.int64)
    x_base = x_ptr + n * sxn + (x_off + c) * sxc
    w_base = w_ptr + (start + c) * swo
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih, h_ok = _tap_in(oh, kh, sh, ph, dh, H)
        for kw in tl.static_range(KW):
            iw, w_ok = _tap_in(ow, kw, sw, pw, dw, W)
            ok = mask & h_ok & w_ok
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=0.0)
            wv = tl.load(w_base + kh * swh + kw * sww, mask=mask, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + (start + c) * sb, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n * syn + (y_off + c) * syc + oh * syh + ow * syw, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_x_dw_kernel(
    go_ptr, w_ptr, gx_ptr,
    total, C, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    swo, swh, sww,
    gxn, gxc, gxh, gxw,
    start, x_off, y_off,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    iw = offs % W
    t = offs // W
    ih = t % H
    t = t // H
    c = t % C
    n = (t // C).to(tl.int64)
    go_base = go_ptr + n * sgn + (y_off + c) * sgc
    w_base = w_ptr + (start + c) * swo
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kh in tl.static_range(KH):
        oh, h_ok = _tap_out(ih, kh, sh, ph, dh, Ho)
        for kw in tl.static_range(KW):
            ow, w_ok = _tap_out(iw, kw, sw, pw, dw, Wo)
            ok = mask & h_ok & w_ok
            gv = tl.load(go_base + oh * sgh + ow * sgw, mask=ok, other=0.0)
            wv = tl.load(w_base + kh * swh + kw * sww, mask=mask, other=0.0)
            acc += gv.to(tl.float32) * wv.to(tl.float32)
    gx_ptrs = gx_ptr + n * gxn + (x_off + c) * gxc + ih * gxh + iw * gxw
    tl.store(gx_ptrs, tl.load(gx_ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _grad_w_dw_kernel(
    go_ptr, x_ptr, gw_ptr,
    P, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    gwo, gwh, gww,
    start, x_off, y_off,
    sh, sw, ph, pw, dh, dw, p_per_split,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per (channel, piece of the pixels): a [taps x pixels] tile of products,
    # summed over pixels at the end and added atomically (pieces of one channel overlap).
    c = tl.program_id(0)
    pid_p = tl.program_id(1)
    taps = tl.arange(0, BLOCK_T)
    t_mask = taps < KH * KW
    kh = taps // KW
    kw = taps % KW
    go_base = go_ptr + (y_off + c) * sgc
    x_base = x_ptr + (x_off + c) * sxc
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    p_begin = pid_p * p_per_split
    for p0 in range(p_begin, p_begin + p_per_split, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        p_mask = (offs < P) & (offs < p_begin + p_per_split)
        n, oh, ow = _unravel_pixel(offs, Ho, Wo)
        gv = tl.load(go_base + n * sgn + oh * sgh + ow * sgw, mask=p_mask, other=0.0).to(tl.float32)
        ih, h_ok = _tap_in(oh[None, :], kh[:, None], sh, ph, dh, H)
        iw, w_ok = _tap_in(ow[None, :], kw[:, None], sw, pw, dw, W)
        ok = t_mask[:, None] & p_mask[None, :] & h_ok & w_ok
        xv = tl.load(x_base + n[None, :] * sxn + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
        acc += xv * gv[None, :]
    tl.atomic_add(gw_ptr + (start + c) * gwo + kh * gwh + kw * gww, tl.sum(acc, axis=1), mask=t_mask)


# ------------------------------------------------------------------------------ bias gradient
@triton.jit
def _grad_b_kernel(
    go_ptr, gb_ptr, P, Ho, Wo,
    sgn, sgc, sgh, sgw,
    out_start, y_off, p_per_split,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    pid_p = tl.program_id(1)
    base = go_ptr + (y_off + c) * sgc
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p_begin = pid_p * p_per_split
    for p0 in range(p_begin, p_begin + p_per_split, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        mask = (offs < P) & (offs < p_begin + p_per_split)
        n, oh, ow = _unravel_pixel(offs, Ho, Wo)
        acc += tl.load(base + n * sgn + oh * sgh + ow * sgw, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(gb_ptr + out_start + c, tl.sum(acc, axis=0))


# --------------------------------------------------------------------------------- host side
class _Geom:
    __slots__ = ("N", "H", "W", "Ho", "Wo", "KH", "KW", "sh", "sw", "ph", "pw", "dh", "dw")

    def conv_args(self):
        return (self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)


def _problem(op, x, weight, bias, blocks_flat, x_offsets, stride, padding, dilation, depthwise,
             grad_out=None):
    check_tensors(op, x, weight, bias, 4, grad_out)
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"{op}: a depthwise weight must have shape [C, 1, kh, kw], got {tuple(weight.shape)}")
    runs = parse_blocks(blocks_flat, x_offsets, weight.shape[0] if depthwise else weight.shape[1],
                        weight.shape[0], x.shape[1], op, depthwise=depthwise)
    g = _Geom()
    g.sh, g.sw = pair(stride, "stride")
    g.ph, g.pw = pair(padding, "padding")
    g.dh, g.dw = pair(dilation, "dilation")
    if min(g.sh, g.sw) <= 0:
        raise ValueError(f"{op}: stride must be positive, got {stride}")
    if min(g.ph, g.pw) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding}")
    if min(g.dh, g.dw) <= 0:
        raise ValueError(f"{op}: dilation must be positive, got {dilation}")
    g.N, _, g.H, g.W = x.shape
    g.KH, g.KW = weight.shape[2], weight.shape[3]
    span_h, span_w = g.dh * (g.KH - 1) + 1, g.dw * (g.KW - 1) + 1
    if g.H + 2 * g.ph < span_h or g.W + 2 * g.pw < span_w:
        raise ValueError(f"{op}: the padded input ({g.H + 2 * g.ph} x {g.W + 2 * g.pw}) is smaller than the "
                         f"dilated kernel ({span_h} x {span_w})")
    g.Ho = (g.H + 2 * g.ph - span_h) // g.sh + 1
    g.Wo = (g.W + 2 * g.pw - span_w) // g.sw + 1
    c_out = sum(r.out_size for r in runs)
    if grad_out is not None and tuple(grad_out.shape) != (g.N, c_out, g.Ho, g.Wo):
        raise ValueError(f"{op}: grad_out has shape {tuple(grad_out.shape)} but the forward output has shape "
                         f"{(g.N, c_out, g.Ho, g.Wo)}")
    return runs, g, c_out


def _dot_precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for half inputs; the default setting
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    return "tf32" if allow_tf32 and not interpreting() else "ieee"


def _gemm_tiles(cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a GEMM with `cols` output columns."""
    block_n = min(64, max(16, next_pow2(cols)))
    if interpreting():
        return 32, block_n, 32, 4  # the interpreter pays per program: fewer, mid-size tiles
    return 64, block_n, 32, 4


def _splits(work_tiles: int, reduce_len: int, block_k: int, device: torch.device,
            split_k: int | None = None) -> tuple[int, int]:
    """(pieces, length of a piece, a multiple of block_k) for a reduction of reduce_len terms.

    By default about two waves of programs fill the device (one piece in the interpreter).
    """
    if split_k is not None:
        splits = max(1, int(split_k))
    elif interpreting():
        splits = 1
    else:
        target = 2 * num_sms(device)
        splits = max(1, min(target // max(work_tiles, 1), triton.cdiv(reduce_len, 4 * block_k)))
    per = triton.cdiv(triton.cdiv(reduce_len, splits), block_k) * block_k
    return triton.cdiv(reduce_len, per), per


def _s(t: torch.Tensor):
    return tuple(t.stride())


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks_flat: Sequence[int],
            x_offsets: Sequence[int], stride=1, padding=0, dilation=1, depthwise: bool = False, *,
            allow_tf32: bool | None = None) -> torch.Tensor:
    """The packed output ``[N, sum(out_stop - out_start), Ho, Wo]`` of all blocks (see module doc)."""
    return _forward("block_conv2d", x, weight, bias, blocks_flat, x_offsets, stride, padding, dilation,
                    depthwise, allow_tf32=allow_tf32)


def _forward(op, x, weight, bias, blocks_flat, x_offsets, stride, padding, dilation, depthwise, *, allow_tf32):
    runs, g, c_out = _problem(op, x, weight, bias, blocks_flat, x_offsets, stride, padding, dilation, depthwise)
    y = torch.empty((g.N, c_out, g.Ho, g.Wo), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    has_bias = bias is not None
    b_arg = bias if has_bias else y  # never read when HAS_BIAS is false
    sb = bias.stride(0) if has_bias else 0
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for r in runs:
            if depthwise:
                total = g.N * r.out_size * g.Ho * g.Wo
                BLOCK = 256
                _fwd_dw_kernel[(triton.cdiv(total, BLOCK),)](
                    x, weight, b_arg, y, total, r.out_size, g.H, g.W, g.Ho, g.Wo,
                    *_s(x), weight.stride(0), weight.stride(2), weight.stride(3), sb, *_s(y),
                    r.out_start, r.x_off, r.y_off, *g.conv_args(),
                    KH=g.KH, KW=g.KW, HAS_BIAS=has_bias, BLOCK=BLOCK)
            else:
                M = g.N * g.Ho * g.Wo
                BM, BN, BK, warps = _gemm_tiles(r.out_size)
                grid = (triton.cdiv(M, BM), triton.cdiv(r.out_size, BN))
                _fwd_dense_kernel[grid](
                    x, weight, b_arg, y, M, g.H, g.W, g.Ho, g.Wo,
                    *_s(x), *_s(weight), sb, *_s(y),
                    r.in_start, r.in_size, r.out_start, r.out_size, r.x_off, r.y_off, *g.conv_args(),
                    KH=g.KH, KW=g.KW, HAS_BIAS=has_bias, DOT_PREC=_dot_precision(x.dtype, allow_tf32),
                    BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)
    return y


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks_flat: Sequence[int],
             x_offsets: Sequence[int], stride=1, padding=0, dilation=1, depthwise: bool = False,
             output_mask: Sequence[bool] = (True, True, True), *, allow_tf32: bool | None = None,
             split_k: int | None = None):
    """``(grad_x, grad_weight, grad_bias)``; an output whose mask entry is false is an empty tensor.

    ``grad_weight`` has the full weight's shape (zero outside the blocks, summed where blocks
    overlap) and ``grad_bias`` the full ``[C_out]``. ``split_k`` forces how many pieces the
    pixel reductions of grad_weight/grad_bias are split into (None: enough to fill the GPU).
    """
    return _backward("block_conv2d_backward", grad_out, x, weight, blocks_flat, x_offsets, stride, padding,
                     dilation, depthwise, output_mask, allow_tf32=allow_tf32, split_k=split_k)


def _backward(op, grad_out, x, weight, blocks_flat, x_offsets, stride, padding, dilation, depthwise,
              output_mask, *, allow_tf32, split_k=None):
    runs, g, _ = _problem(op, x, weight, None, blocks_flat, x_offsets, stride, padding, dilation, depthwise,
                          grad_out=grad_out)
    need_x, need_w, need_b = mask_of(output_mask)
    f32 = dict(dtype=torch.float32, device=x.device)
    empty = torch.empty(0, dtype=x.dtype, device=x.device)
    gx = torch.zeros(x.shape, **f32) if need_x else None
    gw = torch.zeros(weight.shape, **f32) if need_w else None
    gb = torch.zeros(weight.shape[0], **f32) if need_b else None
    prec = _dot_precision(x.dtype, allow_tf32)
    P = g.N * g.Ho * g.Wo
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for r in runs if grad_out.numel() > 0 else ():
            if need_x:
                _launch_grad_x(grad_out, weight, gx, g, r, depthwise, prec)
            if need_w:
                _launch_grad_w(grad_out, x, gw, g, r, depthwise, prec, P, split_k)
            if need_b:
                BLOCK = 256
                splits, per = _splits(r.out_size, P, BLOCK, x.device, split_k)
                _grad_b_kernel[(r.out_size, splits)](
                    grad_out, gb, P, g.Ho, g.Wo, *_s(grad_out), r.out_start, r.y_off, per, BLOCK=BLOCK)
    cast = lambda t: empty if t is None else t.to(x.dtype)  # noqa: E731
    return cast(gx), cast(gw), cast(gb)


def _launch_grad_x(grad_out, weight, gx, g, r: BlockRun, depthwise, prec):
    if depthwise:
        total = g.N * r.in_size * g.H * g.W
        BLOCK = 256
        _grad_x_dw_kernel[(triton.cdiv(total, BLOCK),)](
            grad_out, weight, gx, total, r.in_size, g.H, g.W, g.Ho, g.Wo,
            *_s(grad_out), weight.stride(0), weight.stride(2), weight.stride(3), *_s(gx),
            r.out_start, r.x_off, r.y_off, *g.conv_args(), KH=g.KH, KW=g.KW, BLOCK=BLOCK)
        return
    M = g.N * g.H * g.W
    BM, BN, BK, warps = _gemm_tiles(r.in_size)
    grid = (triton.cdiv(M, BM), triton.cdiv(r.in_size, BN))
    _grad_x_dense_kernel[grid](
        grad_out, weight, gx, M, g.H, g.W, g.Ho, g.Wo,
        *_s(grad_out), *_s(weight), *_s(gx),
        r.in_start, r.in_size, r.out_start, r.out_size, r.x_off, r.y_off, *g.conv_args(),
        KH=g.KH, KW=g.KW, DOT_PREC=prec, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)


def _launch_grad_w(grad_out, x, gw, g, r: BlockRun, depthwise, prec, P, split_k):
    if depthwise:
        BLOCK_T = max(2, next_pow2(g.KH * g.KW))
        BLOCK_P = max(16, 1024 // BLOCK_T)
        splits, per = _splits(r.out_size, P, BLOCK_P, x.device, split_k)
        _grad_w_dw_kernel[(r.out_size, splits)](
            grad_out, x, gw, P, g.H, g.W, g.Ho, g.Wo, *_s(grad_out), *_s(x),
            gw.stride(0), gw.stride(2), gw.stride(3),
            r.out_start, r.x_off, r.y_off, *g.conv_args(), per,
            KH=g.KH, KW=g.KW, BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P)
        return
    cols = r.in_size * g.KH * g.KW
    BM, BN, BK, warps = _gemm_tiles(cols)
    BM = min(BM, max(16, next_pow2(r.out_size)))
    tiles = triton.cdiv(r.out_size, BM) * triton.cdiv(cols, BN)
    splits, per = _splits(tiles, P, BK, x.device, split_k)
    _grad_w_dense_kernel[(triton.cdiv(r.out_size, BM), triton.cdiv(cols, BN), splits)](
        grad_out, x, gw, P, g.H, g.W, g.Ho, g.Wo, *_s(grad_out), *_s(x), *_s(gw),
        r.in_start, r.in_size, r.out_start, r.out_size, r.x_off, r.y_off, *g.conv_args(), per,
        KH=g.KH, KW=g.KW, DOT_PREC=prec, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)
