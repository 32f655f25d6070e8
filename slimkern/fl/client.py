"""The client side of a federated round: run a task, return a reply. No transport.

A ``Task`` is everything one client needs for one round: its id, the round, the key of
what it trains (a ``Switch``, or a ``slimkern.fl.rolex.SubModel``: FedRolex's index sets,
HeteroFL's label split), the *sliced* parameters it receives (the flat vector of the
elements of ``download_key(key)`` in ``Aggregator.layout`` order -- only those travel),
the rule (whose client hooks shape the local loss), the optimiser settings and the seed.
``train_task(model, task, X, Y, indices)`` writes the received elements into its working
copy ``model`` (at the prefix windows of the re-indexed copy for FedRolex), runs
``local_epochs`` of SGD on the client's samples and returns a ``ClientUpdate`` whose
values are the trained elements of ``key`` (``Aggregator.layout(key)`` order). Elements
outside the received slice are never read by the forward pass of the client's switch and
never sent back, so what the working copy holds there does not change the reply.

Randomness comes from ``(seed, round, client)`` only: the batch order and augmentation
from a ``torch.Generator``, per-step switch draws (FjORD) from a ``random.Random``, and
dropout layers from torch's global generator forked for the call
(``slimkern.fl.fingerprint.client_rng``). The same task gives the same reply in
``simulate`` and in a Flower ClientApp (``slimkern.fl.flower``).

A client whose loss is not finite raises ``slimkern.fl.validate.ClientFailure``; any
exception means "dropped with its reason" to the caller.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from slimkern.fl import fingerprint as _fp
from slimkern.fl import fjord_bn as _fjord_bn
from slimkern.fl import rolex as _rolex
from slimkern.fl import validate as _validate
from slimkern.fl.aggregate import Aggregator, ClientUpdate

__all__ = ["Task", "train_task", "local_train", "local_batches", "client_generators", "client_indices", "received",
           "client_aggregator", "as_tensors"]


@dataclass
class Task:
    """One client's work for one round (module docstring)."""
    client: int
    round: int
    key: Any
    values: torch.Tensor
    rule: Any
    lr: float
    seed: int
    local_epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bn_rows: dict | None = None  # FjORD(bn="travel"): the server's BN rows of the client's widths

    @property
    def switch(self):
        """The switch the client runs (the prefix switch of a ``SubModel``)."""
        return _rolex.train_switch(self.key)


def as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)`` of a data set given as tensors, a TensorDataset or a map-style Dataset."""
    if isinstance(ds, (tuple, list)) and len(ds) == 2 and all(isinstance(t, torch.Tensor) for t in ds):
        X, Y = ds
    elif hasattr(ds, "tensors") and len(ds.tensors) == 2:
        X, Y = ds.tensors
    elif hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        items = [ds[i] for i in range(len(ds))]
        X = torch.stack([torch.as_tensor(x) for x, _ in items])
        Y = torch.as_tensor([int(y) for _, y in items])
    else:
        raise TypeError(f"a data set must be (X, Y) tensors, a TensorDataset or a map-style Dataset, "
                        f"got {type(ds).__name__}")
    if len(X) != len(Y):
        raise ValueError(f"data set has {len(X)} inputs but {len(Y)} labels")
    return X, Y.long()


def client_aggregator(model: torch.nn.Module) -> Aggregator:
    """The ``Aggregator`` (parameter layout and windows) of ``model``; server and client
    build the same one from the same architecture."""
    return Aggregator({n: p.shape for n, p in model.named_parameters()}, _rolex.windows_fn(model))


def local_batches(X, Y, idx, sw, strategy, epochs: int, batch_size: int, gen: torch.Generator,
                  pyrng: random.Random, augment=None):
    """The local SGD steps of a client, in order: ``(switches, inputs, labels)`` per step.

    Every epoch draws a permutation of ``idx`` from ``gen`` and cuts it into batches of
    ``batch_size`` (a last batch of one sample is skipped when the client has two or more:
    BN in train mode needs two); each step asks the rule for its switches
    (``strategy.step_switches(sw, pyrng)``) and augments its inputs with ``gen``. A lazy
    generator, so the draws happen in exactly this order whoever consumes it (the
    sequential ``local_train`` or ``slimkern.fl.batched``)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    sw = _rolex.train_switch(sw)
    for _ in range(epochs):
        perm = idx[torch.randperm(len(idx), generator=gen)]
        for s in range(0, len(perm), batch_size):
            bi = perm[s:s + batch_size]
            if len(bi) < 2 and len(perm) >= 2:  # BN in train mode needs two samples
                continue
            sws = strategy.step_switches(sw, pyrng)
            yield sws, (X[bi] if augment is None else augment(X[bi], gen)), Y[bi]


def client_generators(task: "Task") -> tuple[torch.Generator, random.Random]:
    """The client's batch/augmentation generator and its switch-draw ``random.Random``,
    both seeded by ``(seed, round, client)`` only."""
    s, r, c = int(task.seed), int(task.round), int(task.client)
    gen = torch.Generator().manual_seed(int(np.random.default_rng([s, r, c, 7]).integers(2 ** 62)))
    return gen, random.Random(hash((s, r, c)) & 0xFFFFFFFF)


def local_train(net, X, Y, idx, sw, strategy, epochs, lr, batch_size, momentum, weight_decay,
                gen: torch.Generator, pyrng: random.Random, kd_weight: float = 1.0, augment=None) -> None:
    """``epochs`` of SGD on samples ``idx`` at key ``sw`` under the rule ``strategy``'s
    client hooks (per-step switches, several packed with in-place distillation from the
    first; logits shaping; the local context; gradient clipping)."""
    from slimkern.nn import forward_switches, use_switch
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    net.train()
    current, ctx = None, None
    # ``sw`` may be a SubModel key: the client runs its prefix switch on its re-indexed copy
    key, sw = sw, _rolex.train_switch(sw)
    clip = getattr(strategy, "clip_norm", None)
    local = strategy.local_context(net, sw)
    local.__enter__()
    try:
        for sws, xb, yb in local_batches(X, Y, idx, sw, strategy, epochs, batch_size, gen, pyrng, augment):
            if len(sws) == 1:
                if sws[0] != current:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
                    ctx = use_switch(net, sws[0])
                    ctx.__enter__()
                    current = sws[0]
                loss = F.cross_entropy(strategy.train_logits(net(xb), key), yb)
            else:
                # one packed pass; the client's own switch teaches the others (in-place KD)
                outs = [strategy.train_logits(o, key) for o in forward_switches(net, xb, sws)]
                loss = F.cross_entropy(outs[0], yb)
                soft = F.softmax(outs[0].detach(), dim=1)
                for o in outs[1:]:
                    loss = loss + kd_weight * F.cross_entropy(o, soft)
            if not bool(torch.isfinite(loss)):
                raise _validate.ClientFailure(f"the local loss is not finite ({float(loss.detach())})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        local.__exit__(None, None, None)


def client_indices(task: Task, indices, num_samples: int) -> np.ndarray:
    """``indices`` as an array, checked non-empty and within the ``num_samples`` samples."""
    indices = np.asarray(indices)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= num_samples:
        raise ValueError(f"client {task.client}: indices must be non-empty and within the {num_samples} samples")
    return indices


def received(agg: Aggregator, flat: torch.Tensor, task: Task) -> torch.Tensor:
    """A copy of the flat parameters ``flat`` with the task's received values written at the
    elements of its download key (in the client's local, re-indexed coordinates)."""
    where = agg.layout(_rolex.local_key(_rolex.download_key(task.key))).index
    if task.values.shape != where.shape:
        raise ValueError(f"task of client {task.client}: {task.values.numel()} values received, "
                         f"the key {task.key} needs {where.numel()}")
    flat = flat.clone()
    flat[where] = task.values.to(flat.dtype)
    return flat


def train_task(model: torch.nn.Module, task: Task, X: torch.Tensor, Y: torch.Tensor, indices,
               augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
               agg: Aggregator | None = None) -> ClientUpdate:
    """Runs ``task`` on the client's samples ``X[indices]``, ``Y[indices]`` in the working
    copy ``model`` (changed in place) and returns the reply (module docstring). ``agg``:
    the model's ``client_aggregator`` when the caller keeps one (its layouts are cached)."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a slimkern.fl.client.Task, got {type(task).__name__}")
    indices = client_indices(task, indices, len(X))
    agg = agg or client_aggregator(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        flat = received(agg, agg.flatten(params), task)
        for n, t in agg.unflatten(flat).items():
            params[n].copy_(t)
    rule = task.rule
    travel = bool(getattr(rule, "bn_travel", False))
    if travel:  # the server's statistics of every width <= p_max (fresh where it has none)
        _fjord_bn.load_rows(model, task.bn_rows or {}, rule.bn_switches(task.key), fresh_missing=True)
    s, r, c = int(task.seed), int(task.round), int(task.client)
    gen, pyrng = client_generators(task)
    with _fp.client_rng(s, r, c):  # dropout layers draw from the (seed, round, client) stream
        local_train(model, X, Y, indices, task.key, rule, task.local_epochs, task.lr, task.batch_size,
                    task.momentum, task.weight_decay, gen, pyrng, augment=augment)
    u = ClientUpdate(c, task.key, _rolex.from_local(agg, agg.flatten(params), task.key), float(len(indices)))
    if travel:
        u.stats = _fjord_bn.read_rows(model, rule.bn_switches(task.key))
    return u
