"""``parameter_ranges``: the index windows of every parameter/buffer a switch reads.

The single source of truth for slicing outside a forward pass (federated extraction and
scatter-back, export): it uses the same ``windows``/``out_ranges`` as the layers' forward.
"""
from __future__ import annotations

import torch.nn as nn

from slimkern.nn._base import ChannelMixin
from slimkern.nn.batchnorm import _SwitchableBatchNorm
from slimkern.nn.switching import _mods, as_switch
from slimkern.nn.weight_norm import SlimWNConv2d


def parameter_ranges(net: nn.Module, sw, buffers: bool = True) -> dict[str, list[tuple[slice, ...]]]:
    """For each parameter (and buffer) name of ``net``, one index tuple per branch of ``sw``:
    ``net.state_dict()[name][window]`` is what branch i reads and trains.

    * conv weight ``[C_out, C_in, kh, kw]``: ``(out, in, :, :)``; depthwise ``(out, :, :, :)``;
      linear ``(out, in)``; biases ``(out,)``. A weight-normalised conv (``SlimWNConv2d``):
      ``weight_v`` ``(out, in, :, :)``, ``weight_g`` ``(out,)``; its norm runs over the
      branch's window, except in a fused layer, where it runs over the union of the
      switch's windows (so a branch's effective weight also reads the other windows' ``v``). A fused layer's (classifier's) bias is added
      once per switch and listed in every branch's windows.
    * switchable BN: ``weight``/``bias`` ``(ch,)``; ``running_mean``/``running_var``
      ``(row:row+1, ch)``, ``num_batches_tracked`` ``(row:row+1,)`` with ``sw``'s statistics
      row -- only if ``sw`` is registered (omitted otherwise; this function never mutates).
    * anything else (plain modules) is read whole by every branch: full slices.
    Channel windows are ``slice(start, stop)``; never-sliced dims are ``slice(None)``.
    """
    sw = as_switch(sw)
    nb = sw.num_branches
    out: dict[str, list[tuple[slice, ...]]] = {}
    for mname, m in _mods(net):
        pre = f"{mname}." if mname else ""
        try:
            if isinstance(m, ChannelMixin):
                win = m.windows(sw)
                depthwise = getattr(m, "depthwise", False)
                wn = isinstance(m, SlimWNConv2d)
                weight = m.weight_v if wn else m.weight
                spatial = (slice(None),) * (weight.dim() - 2)
                w = []
                for (i0, i1), (o0, o1) in win:
                    in_sl = slice(None) if depthwise else slice(i0, i1)
                    w.append((slice(o0, o1), in_sl) + spatial)
                out[pre + ("weight_v" if wn else "weight")] = w
                if wn:
                    out[pre + "weight_g"] = [(slice(o0, o1),) for _, (o0, o1) in win]
                if m.bias is not None:
                    out[pre + "bias"] = [(slice(o0, o1),) for _, (o0, o1) in win]
            elif isinstance(m, _SwitchableBatchNorm):
                chans = m.out_ranges(sw)
                if m.weight is not None:
                    out[pre + "weight"] = [(slice(s, e),) for s, e in chans]
                    out[pre + "bias"] = [(slice(s, e),) for s, e in chans]
                row = m.switch_row(sw)
                if buffers and row is not None:
                    r = slice(row, row + 1)
                    out[pre + "running_mean"] = [(r, slice(s, e)) for s, e in chans]
                    out[pre + "running_var"] = [(r, slice(s, e)) for s, e in chans]
                    out[pre + "num_batches_tracked"] = [(r,)] * nb
        except ValueError as e:
            raise ValueError(f"layer {mname!r} ({type(m).__name__}): {e}") from None
    named = list(net.named_parameters()) + (list(net.named_buffers()) if buffers else [])
    for name, t in named:
        if name not in out:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if isinstance(dict(net.named_modules()).get(owner), _SwitchableBatchNorm):
                continue  # a BN buffer of an unregistered switch: omitted (see docstring)
            out[name] = [(slice(None),) * t.dim()] * nb
    return out
