"""Shared machinery of the slim layers: channel geometry and plan handling."""
from __future__ import annotations

import torch

from slimkern.switch import Switch, full_channels
from slimkern.nn.plan import Plan, default_plan

_WINDOW_KINDS = ("in", "out")


def _check_width_args(max_width, divisor):
    if isinstance(max_width, bool) or not isinstance(max_width, (int, float)) or max_width < 1.0:
        raise ValueError(f"max_width must be a number >= 1.0 (the base width is 1.0x), got {max_width!r}")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be a positive int, got {divisor!r}")


class SlimModule:
    """Mixin of every slimkern layer. A layer holds the plan of the current pass in
    ``_sk_plan`` and its block table for that plan in ``_sk_tables``.

    Subclasses implement ``_sk_prepare(plan) -> tables`` (pure: validates, computes) and may
    override ``_sk_commit(plan, tables)`` (side effects such as registering BN rows).
    """

    _sk_plan: Plan | None = None
    _sk_tables = None

    def _sk_prepare(self, plan: Plan):  # pragma: no cover - abstract
        raise NotImplementedError

    def _sk_commit(self, plan: Plan | None, tables) -> None:
        if plan is None:
            # Back to the class defaults rather than None in the instance dict: the layer's
            # state is then the same before and after a forward_switches call, and a
            # torch.compile'd step is not recompiled on its second call (a guard on the dict).
            self.__dict__.pop("_sk_plan", None)
            self.__dict__.pop("_sk_tables", None)
            return
        object.__setattr__(self, "_sk_plan", plan)
        object.__setattr__(self, "_sk_tables", tables)

    def _sk_current(self):
        """(plan, tables) for this forward; a layer with no plan runs the base net ``[1.0]x``."""
        if self._sk_plan is None:
            plan = default_plan()
            self._sk_commit(plan, self._sk_prepare(plan))
        return self._sk_plan, self._sk_tables


class ChannelMixin(SlimModule):
    """Geometry of a layer with (possibly) sliced input and output channels.

    ``in_channels``/``out_channels`` are the base (1.0x) counts; ``in_full``/``out_full`` the
    allocated counts (``max_width`` applied to sliced sides only).
    """

    def _init_geometry(self, in_channels, out_channels, max_width, divisor, slice_in, slice_out,
                       in_group, out_group):
        _check_width_args(max_width, divisor)
        for n, v in (("in", in_channels), ("out", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} channels must be a positive int, got {v!r}")
        self.max_width = float(max_width)
        self.divisor = divisor
        self.slice_in = bool(slice_in)
        self.slice_out = bool(slice_out)
        self.in_group = in_group
        self.out_group = out_group
        self.in_full = full_channels(in_channels, max_width, divisor) if slice_in else in_channels
        self.out_full = full_channels(out_channels, max_width, divisor) if slice_out else out_channels

    def in_ranges(self, sw: Switch) -> list[tuple[int, int]]:
        """Input channel range of each branch of ``sw`` (the whole input when not sliced)."""
        if not self.slice_in:
            return [(0, self.in_full)] * sw.num_branches
        return sw.channel_ranges(self.in_channels, self.max_width, self.divisor, self.in_group)

    def out_ranges(self, sw: Switch) -> list[tuple[int, int]]:
        """Output channel range of each branch of ``sw`` (all outputs when not sliced)."""
        if not self.slice_out:
            return [(0, self.out_full)] * sw.num_branches
        return sw.channel_ranges(self.out_channels, self.max_width, self.divisor, self.out_group)

    def windows(self, sw: Switch) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """``((in_start, in_stop), (out_start, out_stop))`` per branch: the single source of
        truth for what a switch reads of this layer (forward, export, federated slicing)."""
        return list(zip(self.in_ranges(sw), self.out_ranges(sw)))

    def _sk_prepare(self, plan: Plan):
        rows = []  # per block: (in_start, in_stop, out_start, out_stop)
        for sw in plan.switches:
            rows += [(i0, i1, o0, o1) for (i0, i1), (o0, o1) in self.windows(sw)]
        if self.slice_out:
            mode = "blocks"
            offsets = None if self.slice_in else [0] * len(rows)
            in_width = sum(i1 - i0 for i0, i1, _, _ in rows) if self.slice_in else self.in_full
        elif self.slice_in:
            mode = "fuse"
            offsets = None
            in_width = sum(i1 - i0 for i0, i1, _, _ in rows)
        else:
            mode, offsets, in_width = "plain", None, self.in_full
        return {"mode": mode, "blocks": rows, "x_offsets": offsets, "in_width": in_width,
                "segments": plan.segments}

    def _check_input(self, x, tables, what):
        if x.shape[1] != tables["in_width"]:
            plan = self._sk_plan
            layout = ("the image (not sliced)" if not self.slice_in else
                      f"the packed blocks of {[str(s) for s in plan.switches]}")
            raise ValueError(f"{what} expected {tables['in_width']} input channels ({layout}) but got "
                             f"{x.shape[1]}: the previous layer does not match this layer's channels/switch")

    def _fuse(self, y, bias, tables):
        """Partial outputs ``[N, G*C, ...]`` -> per switch: sum over its branches + bias once,
        stacked along the batch as ``[S*N, C, ...]`` (switch-major)."""
        n, c = y.shape[0], self.out_full
        rest = y.shape[2:]
        g = len(tables["blocks"])
        y = y.reshape(n, g, c, *rest)
        outs = []
        # split, not per-switch slicing: split's backward concatenates the grads instead of
        # materialising a zero-filled full-size gradient per slice
        parts = y.split([g1 - g0 for g0, g1 in tables["segments"]], 1)
        for z in parts:
            z = z.sum(1)
            if bias is not None:
                z = z + bias.view(c, *([1] * len(rest)))
            outs.append(z)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def _capture(self, x, tables):
        plan = self._sk_plan
        if plan is not None and plan.capture:
            plan.features.append((self, x, tables))

    def _geometry_repr(self):
        s = f", max_width={self.max_width}" if self.max_width != 1.0 else ""
        s += f", divisor={self.divisor}" if self.divisor != 1 else ""
        s += ", slice_in=False" if not self.slice_in else ""
        s += ", slice_out=False" if not self.slice_out else ""
        return s

