"""Switchable batch norm: shared affine, running statistics per switch.

Slimmable networks need private BN statistics per width (Yu et al. 2019, "switchable BN");
the affine ``weight``/``bias`` are shared over the full width. Here the statistics live in
``[S, C_full]`` buffers, one *row* per registered switch:

* rows are registered explicitly (``register_switch``, or ``slimkern.nn.register_switches``
  on a net) or implicitly the first time a switch is set/run/calibrated; a new row starts
  at mean 0, var 1, ``num_batches_tracked`` 0 -- it is never copied from another switch.
  Its statistics come from training with that switch or from ``slimkern.calibrate_bn``.
* the list of registered switches is part of ``state_dict`` (extra state, as strings), and
  loading a state dict resizes the buffers to its rows, so checkpoints round-trip.
* in eval mode, running a switch whose row was never trained or calibrated warns.

Forward calls ``slimkern.ops.switchable_batch_norm`` with ``blocks[g] = (start, stop)`` (the
branch's channels) and ``stat_rows[g]`` (its switch's row).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from slimkern.nn._base import SlimModule, _check_width_args
from slimkern.nn._ops import op
from slimkern.nn.plan import Plan
from slimkern.switch import Switch, full_channels

_ACTIVATIONS = ("none", "relu", "relu6")


class _SwitchableBatchNorm(SlimModule, nn.Module):
    _dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 *, max_width: float = 1.0, divisor: int = 1, group: str | None = None,
                 activation: str = "none", device=None, dtype=None):
        super().__init__()
        _check_width_args(max_width, divisor)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if momentum is not None and not (0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        self.num_features = num_features
        self.max_width, self.divisor, self.group = float(max_width), divisor, group
        self.num_full = full_channels(num_features, max_width, divisor)
        self.eps, self.momentum, self.affine, self.activation = eps, momentum, affine, activation
        fk = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_full, **fk))
            self.bias = nn.Parameter(torch.zeros(self.num_full, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(0, self.num_full, **fk))
        self.register_buffer("running_var", torch.ones(0, self.num_full, **fk))
        self.register_buffer("num_batches_tracked",
                             torch.zeros(0, dtype=torch.long, device=device))
        self.switches: list[Switch] = []
        self.process_group = None  # torch.distributed group whose batch statistics training uses

    @classmethod
    def from_dense(cls, bn: nn.modules.batchnorm._BatchNorm, *, max_width: float = 1.0, divisor: int = 1,
                   group: str | None = None, activation: str = "none"):
        """A switchable BN whose 1.0x prefix holds ``bn``'s affine and whose ``[1.0]x`` row holds
        ``bn``'s running statistics (so ``Switch([1.0])`` in eval mode computes exactly ``bn``).
        Other switches get their own rows later (training or calibration)."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"from_dense takes a BatchNorm module, got {type(bn).__name__}")
        if not bn.track_running_stats:
            raise ValueError("cannot convert a BatchNorm with track_running_stats=False: switchable BN keeps "
                             "per-switch running statistics")
        w = bn.weight if bn.affine else bn.running_mean
        m = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, max_width=max_width, divisor=divisor,
                group=group, activation=activation, device=w.device, dtype=w.dtype)
        c = bn.num_features
        with torch.no_grad():
            if bn.affine:
                m.weight[:c].copy_(bn.weight)
                m.bias[:c].copy_(bn.bias)
            row = m.register_switch(Switch([1.0]))
            m.running_mean[row, :c].copy_(bn.running_mean)
            m.running_var[row, :c].copy_(bn.running_var)
            m.num_batches_tracked[row] = max(int(bn.num_batches_tracked), 1)
        return m

    # ---- channel geometry (same API as the conv/linear layers) --------------------------
    @property
    def in_channels(self):
        return self.num_features

    out_channels = in_channels

    def out_ranges(self, sw: Switch) -> list[tuple[int, int]]:
        """Channel range ``(start, stop)`` of each branch of ``sw``."""
        return sw.channel_ranges(self.num_features, self.max_width, self.divisor, self.group)

    in_ranges = out_ranges

    # ---- switch rows ---------------------------------------------------------------------
    def switch_row(self, sw: Switch) -> int | None:
        """Row of ``sw`` in the running buffers, None if not registered."""
        try:
            return self.switches.index(sw)
        except ValueError:
            return None

    def register_switch(self, sw: Switch) -> int:
        """Adds a fresh statistics row (mean 0, var 1, never tracked) for ``sw``; returns its row."""
        if not isinstance(sw, Switch):
            raise TypeError(f"register_switch takes a Switch, got {type(sw).__name__}")
        row = self.switch_row(sw)
        if row is not None:
            return row
        self.out_ranges(sw)  # validate before growing the buffers
        rm, rv, nb = self.running_mean, self.running_var, self.num_batches_tracked
        self.running_mean = torch.cat([rm, rm.new_zeros(1, self.num_full)])
        self.running_var = torch.cat([rv, rv.new_ones(1, self.num_full)])
        self.num_batches_tracked = torch.cat([nb, nb.new_zeros(1)])
        self.switches.append(sw)
        return len(self.switches) - 1

    def reset_switch_stats(self, sw: Switch) -> None:
        """Resets ``sw``'s row to mean 0, var 1, count 0 (before a calibration)."""
        row = self.switch_row(sw)
        if row is None:
            raise ValueError(f"switch {sw} is not registered in this layer")
        with torch.no_grad():
            self.running_mean[row].zero_()
            self.running_var[row].fill_(1.0)
            self.num_batches_tracked[row].zero_()

    def get_extra_state(self):
        return {"switches": [str(s) for s in self.switches]}

    def set_extra_state(self, state):
        sws = [Switch.parse(s) for s in state["switches"]]
        if len(sws) != self.running_mean.shape[0]:
            raise RuntimeError(f"state dict lists {len(sws)} switches but has {self.running_mean.shape[0]} "
                               "statistics rows")
        self.switches = sws
        plan = self._sk_plan
        if plan is not None:  # rows moved: re-derive this layer's tables for the current plan
            self._sk_commit(plan, self._sk_prepare(plan))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint may hold a different number of switch rows: take its shape.
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if t is not None and t.shape != cur.shape and t.dim() == cur.dim() and t.shape[1:] == cur.shape[1:]:
                setattr(self, name, cur.new_empty(t.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---- plan ----------------------------------------------------------------------------
    def _sk_prepare(self, plan: Plan):
        blocks = []
        for sw in plan.switches:
            blocks += self.out_ranges(sw)
        return {"blocks": blocks, "in_width": sum(e - s for s, e in blocks)}

    def _sk_commit(self, plan, tables):
        if plan is not None:
            rows = [self.register_switch(sw) for sw in plan.switches]
            tables = dict(tables, rows=rows,
                          stat_rows=[rows[s] for s, _ in plan.blocks])
        super()._sk_commit(plan, tables)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(f'{d}-d' for d in self._dims)} "
                             f"input, got shape {tuple(x.shape)}")
        plan, t = self._sk_current()
        if x.shape[1] != t["in_width"]:
            raise ValueError(f"{type(self).__name__} expected {t['in_width']} channels (the packed blocks of "
                             f"{[str(s) for s in plan.switches]}) but got {x.shape[1]}: the previous layer "
                             "does not match this layer's channels/switch")
        rows = t["rows"]
        if self.training:
            with torch.no_grad():
                self.num_batches_tracked[rows] += 1
            if self.momentum is None:  # cumulative average: factor 1/k per row
                counts = self.num_batches_tracked.tolist()
                factors = [1.0 / counts[r] for r in rows]
            else:
                factors = [self.momentum] * len(rows)
        else:
            # The check reads a tensor into Python: torch.compile skips it rather than break the graph.
            if not torch.compiler.is_compiling() and not bool((self.num_batches_tracked[rows] > 0).all()):
                fresh = [str(plan.switches[i]) for i, r in enumerate(rows)
                         if int(self.num_batches_tracked[r]) == 0]
                warnings.warn(f"{type(self).__name__}: switch(es) {fresh} have no BN statistics yet (never trained "
                              "or calibrated); their rows are mean 0 / var 1. Run slimkern.calibrate_bn.",
                              RuntimeWarning, stacklevel=2)
            factors = [0.0] * len(rows)
        fn = op("switchable_batch_norm")
        group = getattr(self, "process_group", None)
        if self.training and group is not None:  # set by slimkern.train.synchronised_batch_norm
            from functools import partial

            from slimkern.train.sync_batch_norm import sync_switchable_batch_norm

            fn = partial(sync_switchable_batch_norm, group=group)
        if len(set(factors)) == 1:
            return fn(x, self.weight, self.bias, self.running_mean, self.running_var, t["blocks"],
                      t["stat_rows"], self.training, factors[0], self.eps, self.activation)
        # rows at different counts (calibrating some switches cumulatively): one call per switch
        outs, at = [], 0
        for s, (g0, g1) in enumerate(plan.segments):
            blocks = t["blocks"][g0:g1]
            width = sum(e - b for b, e in blocks)
            outs.append(fn(x[:, at:at + width], self.weight, self.bias, self.running_mean, self.running_var,
                           blocks, t["stat_rows"][g0:g1], self.training, factors[s], self.eps, self.activation))
            at += width
        return torch.cat(outs, 1)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        s += f", max_width={self.max_width}" if self.max_width != 1.0 else ""
        s += f", divisor={self.divisor}" if self.divisor != 1 else ""
        s += f", activation={self.activation!r}" if self.activation != "none" else ""
        return s + f", switches={[str(w) for w in self.switches]}"


class SwitchableBatchNorm2d(_SwitchableBatchNorm):
    """``BatchNorm2d`` with shared affine and one statistics row per switch (module docstring).

    Args: ``num_features`` (base channels), ``eps``, ``momentum`` (None = cumulative
    average), ``affine``; ``max_width``, ``divisor``, ``group`` as for the conv it follows;
    ``activation`` in ``{"none", "relu", "relu6"}`` fused after the normalisation.
    """

    _dims = (4,)


class SlimBatchNorm1d(_SwitchableBatchNorm):
    """``BatchNorm1d`` on ``[N, C]`` features with per-switch statistics (see SwitchableBatchNorm2d)."""

    _dims = (2,)
