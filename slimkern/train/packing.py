"""When packing several switches into one pass pays: :func:`window_copy_share`, :func:`packing_pays`.

A packed pass (``slimkern.forward_switches``) lays the channels of several switches side by side
in one tensor per layer, and each layer reads every switch's blocks as channel windows of it.
slimkern's own CPU kernels read those windows in place: 1x1 convolutions (the pointwise GEMMs),
depthwise convolutions, dense convolutions of fewer than 8 input channels (the stem's unfolded
GEMMs), switchable BN and linear layers. For them packing saves a pass over the weights and the
per-call overhead of every switch. A dense k x k convolution on wider blocks runs on ATen's
convolution (oneDNN on CPU), which takes contiguous operands only: each window of the input is
copied in and each output copied out, and the backward copies the windows of the input and of
the output gradient again and adds the input gradient into its window. Packing saves such a
layer no arithmetic; one switch at a time it mostly runs one call on a contiguous activation.

Measured (``benchmarks/bench_train_step.py``, batch 64, 32x32, two threads, interleaved, each
against the plain-PyTorch loop; packed / groups of 2 / one switch at a time):

* ResNet-20, every convolution dense 3x3: one switch at a time was the fastest on every machine
  and path. ParaDiS: AMD AVX-512 1.05x / 1.03x / 1.17x; Intel AVX-512 1.09x / 1.09x / 1.13x;
  AMD held to AVX2 1.04x / 0.83x / 1.12x. Sandwich: 0.98x / 1.13x / 1.18x, 0.94x / 0.93x /
  0.99x, 1.10x / 1.06x / 1.05x. A one-thread AVX2 profile of groups of 2 spent 161 ms a step
  in those copies against 33 ms one switch at a time.
* MobileNet-v1, 1x1 and depthwise convolutions behind a 3-channel stem: packing everything beat
  one switch at a time in every run since the portable kernels (AVX2 ParaDiS 1.63-1.74x vs
  1.44-1.53x).

The rule weighs each layer by its weight count, which is its multiply-adds per output pixel at
full width. The project's models sit at the two ends (``python -m slimkern.train.packing``
prints the shares): ResNet-20 0.987, ResNet-18 0.984, WDSR 0.999; MobileNet-v1 and MobileNet-v2
0.0, their only dense convolution being the 3-channel stem. The 0.5 threshold lies between the
two ends; no measurement placed it more finely than that.
"""
from __future__ import annotations

from torch import nn

__all__ = ["check_pack", "packing_pays", "resolve_pack", "window_copy_share"]

# The C++ unfold engine takes dense convolutions whose every block reads fewer input channels
# than this (csrc/ops/cpu/block_conv2d_unfold.cpp, kUnfoldMaxChannels); it reads windows in place.
_UNFOLD_MAX_CHANNELS = 8
_SHARE_THRESHOLD = 0.5


def _weight(m: nn.Module):
    w = getattr(m, "weight", None)
    return w if isinstance(w, nn.Parameter) else getattr(m, "weight_v", None)  # SlimWNConv2d


def _copies_windows(m: nn.Module) -> bool:
    ks = getattr(m, "kernel_size", None)
    if ks is None or getattr(m, "depthwise", False) or tuple(ks) == (1, 1):
        return False
    return getattr(m, "in_full", 0) >= _UNFOLD_MAX_CHANNELS


def window_copy_share(net: nn.Module) -> float:
    """The share of ``net``'s slim convolution and linear weights (multiply-adds per output pixel
    at full width) in dense k x k convolutions of at least 8 input channels: the layers that run
    on ATen's convolution over copied channel windows when switches are packed. 0.0 for a net
    without slim layers."""
    from slimkern.nn import slim_modules

    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    total = copied = 0
    for _, m in slim_modules(net):
        w = _weight(m)
        if w is None or w.dim() < 2:  # BN's affine vectors: no multiply-adds
            continue
        total += w.numel()
        if _copies_windows(m):
            copied += w.numel()
    return copied / total if total else 0.0


def packing_pays(net: nn.Module) -> bool:
    """True when packing several switches into one pass is expected to beat running them one at a
    time: unless more than half of the net's multiply-adds are in layers that copy their channel
    windows (:func:`window_copy_share`). See the module docstring for the measurements."""
    return window_copy_share(net) <= _SHARE_THRESHOLD


def check_pack(pack) -> None:
    """Raises ValueError unless ``pack`` is ``"auto"``, True or False (the ``pack`` argument of
    ``packed_step``, ``run_switches`` and the trainers)."""
    if not (isinstance(pack, bool) or (isinstance(pack, str) and pack == "auto")):
        raise ValueError(f"pack must be 'auto', True or False, got {pack!r}")


def resolve_pack(net: nn.Module, pack) -> bool:
    """``pack`` checked, with ``"auto"`` decided for ``net`` by :func:`packing_pays`."""
    check_pack(pack)
    return packing_pays(net) if pack == "auto" else pack


if __name__ == "__main__":
    from slimkern.models import MODELS, build

    for name in sorted(MODELS):
        print(f"{name:14s} {window_copy_share(build(name, max_width=1.2)):.4f}")
