"""``slimkern.evaluate(net, loader, switches)``: top-1 per switch with its cost.

Costs per switch: total MACs (multiply-adds of one image over all branches), the largest
single branch's MACs (the ParaDiS "distributed" view: with one branch per device, latency
follows the busiest device), and parameters (total and largest branch). They come from
``slimkern.profile``; :func:`closed_form_cost` (the same closed forms, read off the slim
layers' windows) is the fallback and an independent check in the tests.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from slimkern.report import Report, SwitchResult


def _as_switch(s):
    from slimkern.nn import as_switch

    return as_switch(s)


def _spatial_sizes(net: nn.Module, sw, input_size) -> dict[nn.Module, tuple[int, int]]:
    """Output ``(H, W)`` of every SlimConv2d, from one forward of a zero image under ``sw``."""
    import slimkern
    from slimkern.nn import SlimConv2d

    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, tuple(o.shape[-2:])))
             for m in net.modules() if isinstance(m, SlimConv2d)]
    modes = [(m, m.training) for m in net.modules()]
    p = next(net.parameters())
    try:
        net.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a switch without BN statistics warns; the sizes do not care
            slimkern.forward_switches(net, torch.zeros(input_size, device=p.device, dtype=p.dtype), [sw])
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes:
            m.training = t
    return sizes


def closed_form_cost(net: nn.Module, sw, input_size) -> tuple[list[int], list[int]]:
    r"""Per-branch ``(macs, params)`` of ``sw`` on ``net`` for one image of ``input_size``.

    For branch ``b`` with input window :math:`[i_0, i_1)` and output window :math:`[o_0, o_1)`:

    - conv: :math:`H_{out} W_{out} (o_1 - o_0)\, c_{in}\, k_h k_w` MACs with :math:`c_{in} = i_1 - i_0`
      (1 for depthwise), and :math:`(o_1 - o_0) c_{in} k_h k_w` weights (+ bias);
    - linear: :math:`(i_1 - i_0)(o_1 - o_0)` MACs and weights (a fused classifier's bias counts
      once, on branch 0: the device that sums the partial logits adds it);
    - BN: 2 affine parameters per channel, no MACs (folded at deployment); pooling, activations
      and adds are not counted (the papers' convention).
    """
    from slimkern.nn import SlimConv2d, SlimLinear
    from slimkern.nn.batchnorm import _SwitchableBatchNorm

    sw = _as_switch(sw)
    sizes = _spatial_sizes(net, sw, input_size)
    nb = sw.num_branches
    macs, params = [0] * nb, [0] * nb
    for m in net.modules():
        if isinstance(m, SlimConv2d):
            kk = m.kernel_size[0] * m.kernel_size[1]
            h, w = sizes.get(m, (0, 0))
            for b, ((i0, i1), (o0, o1)) in enumerate(m.windows(sw)):
                cin = 1 if m.depthwise else i1 - i0
                macs[b] += h * w * (o1 - o0) * cin * kk
                params[b] += (o1 - o0) * cin * kk + ((o1 - o0) if m.bias is not None else 0)
        elif isinstance(m, SlimLinear):
            for b, ((i0, i1), (o0, o1)) in enumerate(m.windows(sw)):
                macs[b] += (i1 - i0) * (o1 - o0)
                params[b] += (i1 - i0) * (o1 - o0)
                if m.bias is not None and (m.slice_out or b == 0):
                    params[b] += o1 - o0
        elif isinstance(m, _SwitchableBatchNorm) and m.affine:
            for b, (s, e) in enumerate(m.out_ranges(sw)):
                params[b] += 2 * (e - s)
    return macs, params


def switch_cost(net: nn.Module, sw, input_size) -> tuple[int, int, int, int]:
    """``(macs, max_device_macs, params, max_device_params)`` of ``sw`` for one image:
    ``slimkern.profile`` when present, else :func:`closed_form_cost` (same closed forms)."""
    import slimkern

    prof_fn = getattr(slimkern, "profile", None)
    if prof_fn is not None:
        modes = [(m, m.training) for m in net.modules()]
        try:
            net.eval()  # a 1-image pass in train mode would ask BN for batch statistics
            prof = prof_fn(net, sw, input_size=tuple(input_size))
        finally:
            for m, t in modes:
                m.training = t
        return int(prof.macs), int(prof.max_device_macs), int(prof.params), int(prof.max_device_params)
    macs, params = closed_form_cost(net, sw, input_size)
    return sum(macs), max(macs), sum(params), max(params)


@torch.no_grad()
def _accuracy(net: nn.Module, loader: Iterable, switches: list, progress: bool, desc: str) -> list[tuple[int, int]]:
    import slimkern
    from tqdm.auto import tqdm

    p = next(net.parameters())
    correct = torch.zeros(len(switches), dtype=torch.long)
    total = 0
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            x, y = x.to(p.device), y.to(p.device)
            outs = slimkern.forward_switches(net, x, switches)  # all switches in one packed pass
            for i, z in enumerate(outs):
                correct[i] += int((z.argmax(1) == y).sum())
            total += y.shape[0]
    finally:
        for m, t in modes:
            m.training = t
    if total == 0:
        raise ValueError("evaluate: the loader yielded no batch")
    return [(int(c), total) for c in correct]


def evaluate(net: nn.Module, loader: Iterable, switches: Sequence, trained: Iterable | None = None,
             individual: Mapping | None = None, input_size: tuple | None = None, progress: bool = False) -> Report:
    """Top-1 accuracy and cost of every switch of ``net`` on ``loader`` (eval mode, no grad).

    Args:
        net: a slimmable / ParaDiS net (BN statistics of every switch should be calibrated,
            ``slimkern.calibrate_bn``; a switch without statistics warns).
        loader: yields ``(images, labels)``.
        switches: Switch objects, notation strings (``"[0.5, 0.5]x"``) or widths.
        trained: the switches that were trained; each result's ``trained`` says whether its
            switch is among them (None: unknown, reported as ``null``).
        individual: ``{switch: net}`` of individually trained baselines, evaluated at that
            switch on the same data and reported with ``kind="individual"``.
        input_size: ``(1, C, H, W)`` for the costs (default: the first batch's image shape).

    Returns a :class:`~slimkern.report.Report`; ``report.results[i]`` is ``switches[i]``, then
    the individual models.
    """
    sws = [_as_switch(s) for s in switches]
    if not sws:
        raise ValueError("evaluate: give at least one switch")
    if len(set(sws)) != len(sws):
        raise ValueError(f"evaluate: duplicate switches in {[str(s) for s in sws]}")
    trained_set = None if trained is None else {_as_switch(s) for s in trained}
    if input_size is None:
        first = next(iter(loader))
        input_size = (1, *first[0].shape[1:])
    results: list[SwitchResult] = []

    def add(model, sw_list, kind, desc):
        acc = _accuracy(model, loader, sw_list, progress, desc)
        for sw, (c, n) in zip(sw_list, acc):
            macs, max_macs, params, max_params = switch_cost(model, sw, input_size)
            results.append(SwitchResult(
                switch=str(sw), top1=c / n, macs=macs, max_device_macs=max_macs,
                params=params, max_device_params=max_params,
                trained=True if kind == "individual" else (None if trained_set is None else sw in trained_set),
                kind=kind, branches=sw.num_branches, correct=c, total=n))

    add(net, sws, "shared", "evaluate")
    for s, model in (individual or {}).items():
        sw = _as_switch(s)
        add(model, [sw], "individual", f"evaluate individual {sw}")
    return Report(results, {"input_size": list(input_size), "samples": results[0].total})
