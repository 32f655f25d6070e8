"""``slimkern.export``: one plain dense model per device for a switch (ParaDiS deployment).

For a switch with branches ``b_0 .. b_{B-1}`` a slim net computes
``logits = sum_i W[:, b_i] @ f_i(x) + bias`` where ``f_i`` is the sub-network on branch
``i``'s channels (Ozerov et al., ParaDiS; a one-branch switch is an ordinary slimmable width).
``export`` writes each ``x -> W[:, b_i] @ f_i(x)`` out as a standalone ``torch.fx.GraphModule``
of standard torch layers (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d`` with that switch's
statistics row, or folded into the conv with ``fold_bn=True``), weights copied out. Device
``i`` runs ``dep.branches[i]`` alone; only the partial logits travel, and ``dep(x)`` sums
them and adds the classifier bias once. When the fused layer is followed by an epilogue that
reads only its output and shared values (WDSR: the image skip conv and the pixel shuffle),
``dep.fusion`` holds it as a plain ``(x, fused) -> y`` module, run once on the sum:
``y = E(x, sum_i W[:, b_i] @ f_i(x) + bias)``. Weight-normalised slim convs
(``SlimWNConv2d``) become plain ``nn.Conv2d`` holding ``g v / ||v||`` over the switch's active
inputs, computed once.

Branches contain no slimkern code: they save with ``torch.save(branch.state_dict())``, load
with ``torch.load(..., weights_only=True)`` and run under ``torch.export.export``;
:func:`save` writes both forms (``.state_dict.pt`` and ``.pt2`` programs for
``torch.export.load``), so a deployment needs neither pickle nor slimkern.
"""
from __future__ import annotations

import os

import torch
import torch.fx as fx
import torch.nn as nn

from slimkern._branch import BranchGraph
from slimkern.nn.switching import as_switch

__all__ = ["export", "save", "Deployable"]


class Deployable(nn.Module):
    """``branches[i]``: the plain model device ``i`` runs; ``forward`` sums their partial
    outputs, adds ``bias`` (the classifier's, once) broadcast over dim 1, then runs
    ``fusion(x, sum)`` when the net has an epilogue after its fused layer (else None)."""

    def __init__(self, branches, bias: torch.Tensor | None, switch: str, fusion: nn.Module | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.fusion = fusion
        if bias is not None:
            self.bias = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self.switch = switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * (y.dim() - 2)))
        if self.fusion is not None:
            y = self.fusion(x, y)
        return y

    def extra_repr(self) -> str:
        return f"switch={self.switch}"


def _fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Folds every eval-mode BN that directly follows a conv whose only reader it is."""
    from torch.fx.experimental.optimization import fuse
    return fuse(gm.eval(), inplace=False)


def _check_bn_statistics(net: nn.Module, sw) -> None:
    """Every switchable BN must hold statistics *measured* for ``sw``: a row that a bare eval
    forward created is the placeholder mean 0 / var 1 (``num_batches_tracked == 0``), and
    exporting it would silently deploy an un-normalised net."""
    from slimkern.nn.batchnorm import _SwitchableBatchNorm

    missing = []
    for name, m in net.named_modules():
        if isinstance(m, _SwitchableBatchNorm):
            row = m.switch_row(sw)
            if row is None or int(m.num_batches_tracked[row]) == 0:
                missing.append(name or type(m).__name__)
    if missing:
        more = f" (and {len(missing) - 1} more BN layers)" if len(missing) > 1 else ""
        raise ValueError(f"export: layer {missing[0]!r}{more} has no BN statistics for switch {sw}: it was never "
                         f"trained or calibrated with it (an eval forward only adds the placeholder mean 0 / var 1); "
                         f"run slimkern.calibrate_bn(net, loader, [sw]) first")


def export(net: nn.Module, sw, fold_bn: bool = False) -> Deployable:
    """Plain dense per-device models of ``net`` under switch ``sw`` (eval mode).

    Args:
        net: a net of slimkern layers (``slimmify`` output, or built from ``slimkern.nn``)
            with one fused layer (``slice_in`` and not ``slice_out``) whose output is the net's
            output, or feeds an epilogue that reads only it and shared values (WDSR).
        sw: a Switch, notation string or width. Every switchable BN must hold statistics for
            it (trained with it, or ``slimkern.calibrate_bn``); otherwise ValueError.
        fold_bn: fold each BN into the conv before it (conv bias absorbs the shift).

    Returns a ``Deployable`` in eval mode: ``dep.branches[i]`` (a ``torch.fx.GraphModule`` of
    standard layers) is what device ``i`` runs; ``dep.fusion`` (or None) the epilogue run once
    where the partial outputs are summed; ``dep(x)`` equals ``net`` under ``sw`` in eval mode.
    The net is not modified.
    """
    sw = as_switch(sw)
    bg = BranchGraph(net, "export")
    if not bg.slim:
        raise ValueError(f"export: {type(net).__name__} has no slimkern layers; slimmify it first")
    fused = bg.check_fusion(sw, "export", epilogue=True)
    for i in range(sw.num_branches):  # shapes only: a switch the net cannot run is reported as that first
        bg.branch(sw, i, meta=True)
    _check_bn_statistics(net, sw)
    branches = []
    for i in range(sw.num_branches):
        gm = bg.branch(sw, i, meta=False, class_name=f"Branch{i}").eval()
        if fold_bn:
            gm = _fold_bn(gm)
        branches.append(gm)
    fusion = bg.fusion(sw, class_name="Fusion")
    if fusion is not None:
        fusion = _fold_bn(fusion) if fold_bn else fusion.eval()
    bias = fused.bias.detach().clone() if fused is not None and fused.bias is not None else None
    return Deployable(branches, bias, str(sw), fusion).eval()


def save(dep: Deployable, folder: str | os.PathLike, example_input: torch.Tensor) -> list[str]:
    """Writes ``dep`` into ``folder`` in forms that load without pickle and without slimkern:

    * ``branch<i>.pt2`` / ``deployable.pt2``: ``torch.export`` programs of each device's model
      and of the fused sum (``torch.export.load(path).module()(x)``), traced on ``example_input``
      with a dynamic batch dimension (``Dim.AUTO``: static where the graph needs it);
    * ``branch<i>.state_dict.pt`` / ``deployable.state_dict.pt``: the weights, for
      ``torch.load(path, weights_only=True)``;
    * ``fusion.pt2`` / ``fusion.state_dict.pt`` when ``dep.fusion`` is not None: the epilogue,
      called as ``fusion(x, sum of the partial outputs + bias)``.

    Every file is written atomically (temporary file + ``os.replace``). Returns the paths of
    the ``branch<i>.pt2`` files.
    """
    if not isinstance(dep, Deployable):
        raise TypeError(f"save expects the Deployable returned by slimkern.export, got {type(dep).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor (one input batch), got {type(example_input).__name__}")
    from slimkern.train.checkpoint import atomic_write as _atomic_write

    folder = os.fspath(folder)
    dep = dep.eval()
    batch = ({0: torch.export.Dim.AUTO},)
    if example_input.dim() and example_input.shape[0] == 1:
        example_input = torch.cat([example_input] * 2)  # torch.export fixes dimensions of size 1
    paths = []
    with torch.no_grad():
        for i, branch in enumerate(dep.branches):
            program = torch.export.export(branch, (example_input,), dynamic_shapes=batch)
            p = os.path.join(folder, f"branch{i}.pt2")
            _atomic_write(p, lambda fh, prog=program: torch.export.save(prog, fh))
            _atomic_write(os.path.join(folder, f"branch{i}.state_dict.pt"),
                          lambda fh, b=branch: torch.save(b.state_dict(), fh))
            paths.append(p)
        if dep.fusion is not None:
            summed = sum(b(example_input) for b in dep.branches)
            if dep.bias is not None:
                summed = summed + dep.bias.view(1, -1, *([1] * (summed.dim() - 2)))
            program = torch.export.export(dep.fusion, (example_input, summed), dynamic_shapes=batch * 2)
            _atomic_write(os.path.join(folder, "fusion.pt2"), lambda fh, prog=program: torch.export.save(prog, fh))
            _atomic_write(os.path.join(folder, "fusion.state_dict.pt"),
                          lambda fh: torch.save(dep.fusion.state_dict(), fh))
        program = torch.export.export(dep, (example_input,), dynamic_shapes=batch)
        _atomic_write(os.path.join(folder, "deployable.pt2"), lambda fh: torch.export.save(program, fh))
        _atomic_write(os.path.join(folder, "deployable.state_dict.pt"), lambda fh: torch.save(dep.state_dict(), fh))
    return paths
