"""One multi-switch training step (forward + backward) in packed groups of switches.

``slimkern.forward_switches`` runs all switches of a step in one packed pass, so every
switch's activations are alive until the backward: peak memory grows with the number of
switches. ``packed_step(..., group_size=k)`` trades some of the packing's speed for memory:
it runs the switches in consecutive groups of ``k`` (one packed forward and one backward per
group); gradients accumulate in ``.grad`` across groups.

Gradients are linear, and every cross-switch target (a teacher's logits for KD, the full
switch's features for ParaDiS' activation distillation) is *detached*, so any grouping gives
exactly the gradient of :math:`\\sum_i \\mathcal{L}_i` -- the one-backward-of-the-sum of
ParaDiS Algorithm 1 (Ozerov et al., arXiv:2110.02724) and of the US-Nets sandwich rule
(Yu & Huang 2019). ``group_size=1`` is the papers' one-switch-at-a-time loop;
``group_size=None`` puts every switch in one group.

Which is fastest depends on the net, so by default (``pack="auto"``) a group is one packed pass
only where packing pays (:func:`slimkern.train.packing.packing_pays`): on nets whose 1x1,
depthwise and BN layers run on slimkern's own kernels, which read the packed channel windows in
place (MobileNet-v1: packing everything beat one switch at a time in every AVX2 run, ParaDiS
1.63-1.74x vs 1.44-1.53x the plain loop). On nets of dense 3x3 convolutions, which run on oneDNN
and copy every window in and out, packing saves no arithmetic and one switch at a time was the
fastest on every machine measured (ResNet-20, groups of 2 about 12 % slower), so there the
switches of a group run one at a time (``group_size`` is an upper bound on the switches alive
at once). ``pack=True`` packs every group as asked; ``pack=False`` runs one switch at a time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from slimkern.train.packing import resolve_pack

__all__ = ["packed_loss", "packed_step"]


def packed_step(net: nn.Module, x: torch.Tensor, switches: Sequence,
                loss_fn: Callable[[int, torch.Tensor, torch.Tensor | None, list], torch.Tensor],
                group_size: int | None = None, features: bool = True, pack: bool | str = "auto"
                ) -> list[torch.Tensor]:
    """Forward + backward of :math:`\\sum_i` ``loss_fn(i, ...)`` over ``switches``, in groups.

    Args:
        net: a slimmable net (``slimkern.models``, ``slimkern.slimmify``).
        x: the input batch.
        switches: the step's switches (Switch, notation string or width), in the order their
            losses may refer to each other: a teacher before its students.
        loss_fn: ``loss_fn(i, logits, feats, prev) -> scalar tensor`` for switch ``i``;
            ``feats`` are its classifier inputs zero-padded to the full width (None when
            ``features=False``); ``prev[j] = (logits_j, feats_j)``, detached, for every
            ``j < i`` (targets such as a wide teacher's logits come from there).
        group_size: the most switches per packed forward/backward (None: all in one group); with
            ``pack="auto"`` on a net where packing does not pay, each switch runs on its own.
        features: also compute the per-switch features (ParaDiS' activation loss needs them).
        pack: ``"auto"`` (default): pack each group into one pass where
            :func:`~slimkern.train.packing.packing_pays` says packing beats one switch at a
            time, else run the group's switches one at a time; ``True``: always pack;
            ``False``: always one at a time. Losses and gradients are the same either way (to
            float rounding).

    Returns the per-switch losses (detached). Gradients are *added* to ``.grad``; zero them
    before the step as usual. BN statistics rows update once per switch whatever the grouping.
    """
    import slimkern

    sws = list(switches) if not isinstance(switches, (str, slimkern.Switch)) else None
    if sws is None:
        raise TypeError("packed_step takes a list of switches; wrap a single one in a list")
    if not sws:
        raise ValueError("packed_step needs at least one switch")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if group_size is None:
        group_size = len(sws)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if not resolve_pack(net, pack):
        group_size = 1
    prev: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    losses: list[torch.Tensor] = []
    for g0 in range(0, len(sws), group_size):
        total, group_losses = packed_loss(net, x, sws[g0:g0 + group_size], loss_fn, features=features, prev=prev)
        losses += group_losses
        if total.requires_grad:
            total.backward()
    return losses


def packed_loss(net: nn.Module, x: torch.Tensor, switches: Sequence,
                loss_fn: Callable[[int, torch.Tensor, torch.Tensor | None, list], torch.Tensor],
                features: bool = True, prev: list | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward half of :func:`packed_step` for one packed group: :math:`\\sum_i \\mathcal{L}_i`
    over ``switches`` from ONE ``forward_switches`` pass, without the backward.

    It is the part to hand to ``torch.compile``: with the slimkern ops' fake kernels and
    autograd registrations the whole pass (plan, packed ops, fusion, losses) is one graph
    (``fullgraph=True`` holds), and ``total.backward()`` runs the compiled backward::

        step = torch.compile(slimkern.train.packed_loss, fullgraph=True)
        total, losses = step(net, x, switches, loss_fn)
        total.backward()

    Args as in :func:`packed_step`; ``prev`` is the list of detached ``(logits, feats)`` of the
    switches of earlier groups (None: this group is the first). Switch ``j`` of this group is
    switch ``i = len(prev)`` for ``loss_fn`` when its turn comes; its targets are appended to
    ``prev`` in place, so consecutive groups chain.

    Returns ``(total, losses)``: the summed loss (with its graph) and the per-switch losses
    (detached).
    """
    import slimkern

    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if prev is None:
        prev = []
    elif not isinstance(prev, list):
        raise TypeError(f"prev must be a list of (logits, feats) pairs or None, got {type(prev).__name__}")
    if features:
        logits, feats = slimkern.forward_switches(net, x, switches, return_features=True)
    else:
        logits = slimkern.forward_switches(net, x, switches)
        feats = [None] * len(logits)
    total = None
    losses: list[torch.Tensor] = []
    for z, f in zip(logits, feats):
        i = len(prev)
        loss = loss_fn(i, z, f, prev)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {got} for switch {i}")
        prev.append((z.detach(), f.detach() if f is not None else None))
        losses.append(loss.detach())
        total = loss if total is None else total + loss
    return total, losses
