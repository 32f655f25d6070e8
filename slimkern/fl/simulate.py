"""In-process federated simulation over clients of different capacity.

One round (``simulate``):
  1. the server picks ``clients_per_round`` clients (seeded by ``(seed, round)``);
  2. each picked client receives the sliced parameters of the switch it trains this round
     (only those elements travel: bytes down = elements x element size), trains
     ``local_epochs`` of SGD on its own samples, and returns the same slice (bytes up);
     clients that drop out are simply absent, and so is a client whose local training
     raises or whose loss is not finite (dropped with its reason);
  3. the server validates every update (NaN/inf, shapes, the switch it assigned, sample
     counts; ``slimkern.fl.validate``), rejects bad ones with a logged reason, optionally
     clips each change (``max_update_norm``), then aggregates with the strategy's rule and
     checks the aggregate itself (an overflowing mean is redone in float64); a round where
     nobody returns leaves the model unchanged and says so;
  4. every ``eval_every`` rounds the server recomputes the BN statistics of each evaluated
     switch on server-side data (``calib_set``; BN statistics never travel) and measures
     top-1 accuracy on ``test_set`` for every switch in use and per tier;
  5. the state (flat parameters, round, history) and the run description are checkpointed
     atomically, so ``resume=True`` continues to the identical result -- and refuses a
     checkpoint of another run, naming what differs (``slimkern.fl.fingerprint``).

Randomness is derived from ``(seed, round, client)`` only -- dropout layers included, which
draw from a generator seeded by that stream, not from torch's global one -- so a run is
reproducible and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slimkern.fl.aggregate import Aggregator, ClientUpdate
from slimkern.fl.partition import partition as _partition
from slimkern.fl import rolex as _rolex
from slimkern.fl import fjord_bn as _fjord_bn
from slimkern.fl.strategy import Strategy, get_strategy
from slimkern.fl import fingerprint as _fp
from slimkern.fl import validate as _validate
from slimkern.fl import budget as _budget

__all__ = ["Tier", "Client", "History", "RoundRecord", "parse_tiers", "make_clients", "simulate"]

logger = logging.getLogger("slimkern.fl")


def _Switch():
    from slimkern.switch import Switch
    return Switch


@dataclass(frozen=True)
class Tier:
    """A kind of client: ``switch`` is what its hardware affords (``[0.5, 0.5]`` = two
    devices of the 0.5x size), ``fraction`` the share of clients of this kind. A tier can
    instead give its devices' ``budget`` (``slimkern.fl.budget.Budget``) with ``switch=None``:
    ``simulate`` then chooses the switch with ``assign_switch`` on the net's profile."""
    name: str
    switch: Any
    fraction: float
    budget: Any = None


@dataclass
class Client:
    id: int
    indices: np.ndarray
    tier: str
    tier_switch: Any
    budget: Any = None  # the tier's device budget when its switch is still to be chosen


def parse_tiers(text: str) -> list[Tier]:
    """``"1.0:0.3,0.5:0.4,[0.5,0.5]:0.3"`` -> tiers; an optional ``name=`` prefix names one
    (``"full=1.0:0.3"``). Fractions must be positive and sum to 1.

    A tier can be a device budget in braces instead of a switch:
    ``"phone={macs=2M,devices=2}:0.3"`` (keys ``macs``, ``params``, ``memory``, ``devices``;
    numbers take k/M/G, memory also KB/MB/GB/KiB/MiB/GiB; see
    ``slimkern.fl.budget.parse_budget``). Its switch is chosen by ``simulate`` (or
    ``slimkern.fl.budget.assign_tiers``) with ``assign_switch`` on the net's profile.
    """
    from slimkern.fl.budget import parse_budget

    Switch = _Switch()
    if not isinstance(text, str) or not text.strip():
        raise ValueError("tiers must be a non-empty string like '1.0:0.3,0.5:0.4,[0.5,0.5]:0.3' or "
                         "'phone={macs=2M,devices=2}:0.5,full=1.0:0.5'")
    items = [s.strip() for s in re.split(r",(?![^\[]*\])(?![^{]*})", text) if s.strip()]
    tiers = []
    for item in items:
        name = None
        if "=" in item.split("{", 1)[0]:
            name, item = (s.strip() for s in item.split("=", 1))
        if ":" not in item:
            raise ValueError(f"tier {item!r}: expected 'switch:fraction' or '{{budget}}:fraction', "
                             "e.g. '[0.5,0.5]:0.3' or '{macs=2M,devices=2}:0.3'")
        sw_text, frac_text = item.rsplit(":", 1)
        sw_text = sw_text.strip()
        if sw_text.startswith("{"):
            if not sw_text.endswith("}"):
                raise ValueError(f"tier {item!r}: a budget is written in braces, e.g. '{{macs=2M,devices=2}}'")
            try:
                budget = parse_budget(sw_text[1:-1])
            except ValueError as exc:
                raise ValueError(f"tier {item!r}: {exc}") from None
            tiers.append(Tier(name or sw_text, None, _fraction(item, frac_text), budget))
            continue
        if not sw_text.endswith("x"):
            sw_text += "x"
        try:
            sw = Switch.parse(sw_text)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"tier {item!r}: {exc}") from None
        tiers.append(Tier(name or str(sw), sw, _fraction(item, frac_text)))
    total = sum(t.fraction for t in tiers)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"tier fractions sum to {total:g}, not 1")
    if len({t.name for t in tiers}) != len(tiers):
        raise ValueError(f"tier names must be distinct: {[t.name for t in tiers]}")
    return tiers


def _fraction(item: str, text: str) -> float:
    try:
        frac = float(text)
    except ValueError:
        raise ValueError(f"tier {item!r}: fraction {text!r} is not a number") from None
    if not 0 < frac <= 1:
        raise ValueError(f"tier {item!r}: fraction must be in (0, 1], got {frac}")
    return frac


def make_clients(labels, tiers: Sequence[Tier], num_clients: int, partition: str = "dirichlet",
                 alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0) -> list[Client]:
    """Split ``labels`` over ``num_clients`` and give each client a tier: the counts follow the
    fractions (largest remainder, every tier at least one client), shuffled by ``seed``."""
    if num_clients < len(tiers):
        raise ValueError(f"{num_clients} clients cannot fill {len(tiers)} tiers: every tier needs at least "
                         f"one client (use at least {len(tiers)} clients or fewer tiers)")
    parts = _partition(labels, num_clients, partition, alpha=alpha,
                       classes_per_client=classes_per_client, seed=seed)
    raw = [t.fraction * num_clients for t in tiers]
    counts = [max(1, int(math.floor(r))) for r in raw]
    order = sorted(range(len(tiers)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < num_clients:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > num_clients:  # take from the most over-served tier that keeps one client
        j = max((k for k in range(len(tiers)) if counts[k] > 1), key=lambda k: counts[k] - raw[k])
        counts[j] -= 1
    kinds = [k for k, c in enumerate(counts) for _ in range(c)]
    kinds = [kinds[i] for i in np.random.default_rng([seed, 1]).permutation(num_clients)]
    return [Client(c, parts[c], tiers[k].name, tiers[k].switch, getattr(tiers[k], "budget", None))
            for c, k in enumerate(kinds)]


@dataclass
class RoundRecord:
    round: int
    accuracy: dict[str, float]          # switch notation -> top-1 (only on evaluated rounds)
    tier_accuracy: dict[str, float]     # tier name -> top-1 of the tier's switch
    bytes_down: dict[str, int]          # tier name -> bytes sent to that tier's clients
    bytes_up: dict[str, int]
    wall_time: float
    selected: list[int]
    accepted: list[int]
    rejected: list[tuple[int, str]]
    dropped: list[int]
    note: str = ""
    dropped_reasons: list[tuple[int, str]] = field(default_factory=list)  # clients whose training failed


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    tiers: dict[str, str] = field(default_factory=dict)  # tier name -> evaluated switch
    # grouped strategies (clustered): group (its switch's notation) -> that group's final
    # model, a state dict with BN statistics calibrated for the group's switches
    # (``net.load_state_dict(history.models[g])`` runs it); not part of ``to_dict``
    models: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def last_accuracy(self) -> dict[str, float]:
        for r in reversed(self.rounds):
            if r.tier_accuracy:
                return dict(r.tier_accuracy)
        return {}

    def total_bytes(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.rounds:
            for t, b in r.bytes_down.items():
                out.setdefault(t, {"down": 0, "up": 0})["down"] += b
            for t, b in r.bytes_up.items():
                out.setdefault(t, {"down": 0, "up": 0})["up"] += b
        return out

    def to_dict(self) -> dict:
        return {"tiers": dict(self.tiers), "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        rounds = []
        for r in d["rounds"]:
            r = dict(r)
            r["rejected"] = [tuple(x) for x in r["rejected"]]
            r["dropped_reasons"] = [tuple(x) for x in r.get("dropped_reasons", [])]
            rounds.append(RoundRecord(**r))
        return cls(rounds, dict(d["tiers"]))


# -- data helpers ---------------------------------------------------------------------------

def _as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
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


def _params(net) -> dict[str, torch.nn.Parameter]:
    return dict(net.named_parameters())


def _load_flat(params: dict, agg: Aggregator, flat: torch.Tensor) -> None:
    with torch.no_grad():
        for n, t in agg.unflatten(flat).items():
            params[n].copy_(t)


def _accuracy(net, X, Y, sw, batch_size) -> float:
    from slimkern.nn import use_switch
    net.eval()
    correct = 0
    with torch.no_grad(), use_switch(net, sw):
        for i in range(0, len(X), batch_size):
            correct += int((net(X[i:i + batch_size]).argmax(1) == Y[i:i + batch_size]).sum())
    return correct / max(1, len(X))


def _calibrate(net, X, Y, switches, batch_size, num_batches) -> None:
    from slimkern.nn import calibrate_bn
    batches = [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    calibrate_bn(net, batches, list(switches), num_batches=min(num_batches, len(batches)))


def _local_train(net, X, Y, idx, sw, strategy: Strategy, epochs, lr, batch_size, momentum,
                 weight_decay, gen: torch.Generator, pyrng: random.Random, kd_weight: float = 1.0,
                 augment=None) -> None:
    from slimkern.nn import forward_switches, use_switch
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    net.train()
    idx = torch.as_tensor(idx, dtype=torch.long)
    current, ctx = None, None
    # ``sw`` may be a SubModel key: the client runs its prefix switch on its re-indexed copy
    key, sw = sw, _rolex.train_switch(sw)
    clip = getattr(strategy, "clip_norm", None)
    local = strategy.local_context(net, sw)
    local.__enter__()
    try:
        for _ in range(epochs):
            perm = idx[torch.randperm(len(idx), generator=gen)]
            for s in range(0, len(perm), batch_size):
                bi = perm[s:s + batch_size]
                if len(bi) < 2 and len(perm) >= 2:  # BN in train mode needs two samples
                    continue
                sws = strategy.step_switches(sw, pyrng)
                xb = X[bi] if augment is None else augment(X[bi], gen)
                if len(sws) == 1:
                    if sws[0] != current:
                        if ctx is not None:
                            ctx.__exit__(None, None, None)
                        ctx = use_switch(net, sws[0])
                        ctx.__enter__()
                        current = sws[0]
                    loss = F.cross_entropy(strategy.train_logits(net(xb), key), Y[bi])
                else:
                    # one packed pass; the client's own switch teaches the others (in-place KD)
                    outs = [strategy.train_logits(o, key) for o in forward_switches(net, xb, sws)]
                    loss = F.cross_entropy(outs[0], Y[bi])
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


def _fingerprint(strategy, clients, seed, net_names, augment=None) -> str:
    extra = {} if augment is None else {"augment": repr(augment)}
    desc = json.dumps({"strategy": repr(strategy), "seed": seed, "params": net_names, **extra,
                       "clients": [(c.id, c.tier, str(c.tier_switch), len(c.indices),
                                    int(np.asarray(c.indices).sum())) for c in clients]})
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


# -- the simulation -------------------------------------------------------------------------

def simulate(net: torch.nn.Module, train_set, test_set, clients: Sequence[Client], strategy="paradis",
             rounds: int = 10, local_epochs: int = 1, lr: float = 0.05, batch_size: int = 32,
             clients_per_round: int | None = None, seed: int = 0, progress: bool = True,
             checkpoint: str | None = None, resume: bool = False, calib_set=None, *,
             momentum: float = 0.9, weight_decay: float = 5e-4, lr_schedule: str = "constant",
             eval_every: int = 1,
             calib_batches: int = 20, eval_batch_size: int = 256, dropout: float = 0.0,
             fault_fn: Callable[[int, ClientUpdate], ClientUpdate | None] | None = None,
             augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
             max_update_norm: float | None = None, max_num_samples: float | None = _validate.MAX_NUM_SAMPLES,
             switch_candidates: Sequence | None = None,
             log: Callable[[str], None] | None = None) -> History:
    """Federated training of ``net`` (a slimmable / ParaDiS net; see the module docstring).

    Args:
        clients: ``Client`` objects (``make_clients``); each has its sample indices into
            ``train_set`` and its tier switch (what its hardware affords).
        strategy: a name in ``slimkern.fl.strategy.STRATEGIES`` or a ``Strategy``.
        calib_set: server-side data for recomputing BN statistics before evaluation; BN
            statistics never travel. Defaults to ``train_set`` (a real server would not
            hold it; the demo passes a held-out split).
        lr_schedule: "constant", or "cosine": round r uses ``lr * (1 + cos(pi r / rounds)) / 2``.
        dropout: probability that a picked client never returns (seeded).
        augment: ``(images, generator) -> images``, applied to every local training batch
            with the client's seeded generator (e.g. ``slimkern.fl.augment.RandomAffine``);
            evaluation and BN calibration see the data unchanged.
        fault_fn: ``(round, update) -> update or None``, applied to every returned update
            before the server sees it (for robustness tests: poison, reshape, drop).
            Whatever comes back is validated: every per-update problem is a rejection with
            its reason in ``RoundRecord.rejected`` (``slimkern.fl.validate``); a client whose
            local training raises or whose loss is not finite is dropped with its reason in
            ``RoundRecord.dropped_reasons``; the run goes on.
        max_update_norm: clip each client's change ``w_k - w`` (its trained elements) to
            this L2 norm before averaging (DP-FedAvg's clipping; None: off).
        max_num_samples: sample counts above this are rejected (so are non-finite,
            non-positive ones and counts above the client's own number of samples).
        switch_candidates: switches that tiers given as device budgets choose from
            (default ``slimkern.fl.budget.default_candidates``).
        checkpoint / resume: file written atomically after every round; with ``resume`` an
            existing file is continued only if it was written by the same run: the
            checkpoint's run description (``slimkern.fl.fingerprint``: strategy and its
            arguments, seed, lr, schedule, rounds, local epochs, batch size, momentum,
            weight decay, dropout, clients per round, clipping, augmentation, initial
            weights, clients) must match, else a ValueError names the fields that differ.
            Loaded with ``torch.load(weights_only=True)``.

    Returns the ``History``; ``net`` ends with the final parameters (for ``clustered``,
    those of the group of the widest tier) and BN statistics calibrated for every
    evaluated switch. For ``clustered`` every group's model is kept in ``History.models``
    (each evaluated per round on its own tiers' switches, and saved in the checkpoint).
    """
    for name, v, lo in (("rounds", rounds, 0), ("local_epochs", local_epochs, 1),
                        ("batch_size", batch_size, 1), ("eval_every", eval_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name, v in (("max_update_norm", max_update_norm), ("max_num_samples", max_num_samples)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ValueError(f"{name} must be a positive finite number or None, got {v!r}")
    if not clients:
        raise ValueError("no clients")
    ids = [c.id for c in clients]
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    k = len(clients) if clients_per_round is None else clients_per_round
    if not 1 <= k <= len(clients):
        raise ValueError(f"clients_per_round must be in [1, {len(clients)}], got {clients_per_round}")
    if checkpoint is None and resume:
        raise ValueError("resume=True needs a checkpoint path")
    from slimkern.nn import parameter_ranges

    log = log or logger.info
    strat = get_strategy(strategy)
    Xtr, Ytr = _as_tensors(train_set)
    Xte, Yte = _as_tensors(test_set)
    Xc, Yc = _as_tensors(calib_set) if calib_set is not None else (Xtr, Ytr)
    for c in clients:
        idx = np.asarray(c.indices)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(Xtr):
            raise ValueError(f"client {c.id}: indices must be non-empty and within the {len(Xtr)} training samples")

    params = _params(net)
    # tiers given as device budgets: each one's switch chosen by assign_switch on this net's profile
    clients = _budget.resolve_clients(clients, net, (1, *Xtr.shape[1:]), switch_candidates, log)
    agg = Aggregator({n: p.shape for n, p in params.items()}, _rolex.windows_fn(net))
    agg.max_num_samples = max_num_samples
    elsize = next(iter(params.values())).element_size()
    by_id = {c.id: c for c in clients}
    # labels each client has data for (None: all labels of the training set), for label split
    all_labels = set(Ytr.tolist())
    client_labels = {}
    for c in clients:
        have = set(Ytr[torch.as_tensor(np.asarray(c.indices), dtype=torch.long)].tolist())
        client_labels[c.id] = None if have >= all_labels else tuple(sorted(have))
    tier_switches = sorted({c.tier_switch for c in clients}, key=str)
    assigned = {c.id: strat.client_switch(c.tier_switch, tier_switches) for c in clients}
    tier_eval: dict[str, Any] = {}
    for c in clients:
        tier_eval.setdefault(c.tier, strat.eval_switch(assigned[c.id]))
    eval_switches = sorted(set(tier_eval.values()), key=str)
    groups = sorted({strat.group(assigned[i]) for i in ids}, key=str) if strat.grouped else [None]
    fp = _fingerprint(strat, clients, seed, list(params), augment)
    # everything that changes the trained weights; a resumed checkpoint must match it field by field
    run_desc = _fp.describe(
        strategy=strat, seed=seed, lr=lr, lr_schedule=lr_schedule, rounds=rounds, local_epochs=local_epochs,
        batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, dropout=dropout,
        clients_per_round=k, max_update_norm=max_update_norm, max_num_samples=max_num_samples, augment=augment,
        params=[(n, list(p.shape)) for n, p in params.items()], model=_fp.model_digest(net),
        initial_weights=_fp.weights_hash(agg.flatten(params)),
        clients=_fp.clients_digest(clients))

    flat0 = agg.flatten(params).clone()
    state = {g: flat0.clone() for g in groups}
    # FjORD(bn="travel"): the server's per-width BN statistics (switch -> bn name -> rows)
    travel = bool(getattr(strat, "bn_travel", False))
    bn_state: dict = {}
    history = History(tiers={t: str(s) for t, s in tier_eval.items()})
    start = 0
    if resume and os.path.exists(checkpoint):
        ck = _fp.load_checkpoint(checkpoint)  # torch.load(weights_only=True)
        _fp.check(ck, run_desc, checkpoint)  # ValueError naming every field that differs
        state = {(None if g == "__none__" else _Switch().parse(g)): t for g, t in ck["state"].items()}
        bn_state = _fjord_bn.from_checkpoint(ck.get("bn", {}))
        history = History.from_dict(ck["history"])
        start = ck["round"]
        log(f"resuming from {checkpoint} at round {start}")

    work = copy.deepcopy(net)
    wparams = _params(work)
    iterator = range(start, rounds)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=rounds, initial=start, desc=f"fl {strat.name}", leave=False)
        except ImportError:  # pragma: no cover
            bar = None

    def bn_stats(sws) -> None:
        """BN statistics of ``sws`` in ``net``: the travelled ones, else calibrated on server data."""
        if travel:
            sws = _fjord_bn.load_for_eval(net, bn_state, sws)
        if sws:
            _calibrate(net, Xc, Yc, sws, eval_batch_size, calib_batches)

    def evaluate_all() -> tuple[dict[str, float], dict[str, float]]:
        acc: dict[str, float] = {}
        for g in groups:
            sws = [s for s in eval_switches if not strat.grouped or strat.group(s) == g]
            if not sws:
                continue
            _load_flat(params, agg, state[g])
            bn_stats(sws)
            for s in sws:
                acc[str(s)] = _accuracy(net, Xte, Yte, s, eval_batch_size)
        return acc, {t: acc[str(s)] for t, s in tier_eval.items()}

    for r in iterator:
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, r])
        picked = sorted(int(i) for i in rng.choice(ids, size=k, replace=False))
        drops = rng.random(len(picked)) < dropout
        dropped = [c for c, d in zip(picked, drops) if d]
        round_sw = {c: strat.task(c, assigned, r, seed, client_labels[c]) for c in picked}
        lr_r = lr if lr_schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * r / rounds))
        bytes_down: dict[str, int] = {}
        bytes_up: dict[str, int] = {}
        updates_by_group: dict[Hashable, list[ClientUpdate]] = {g: [] for g in groups}
        drop_reasons: list[tuple[int, str]] = []
        screened: list[tuple[int, str]] = []  # rejected before the rule (sample counts)
        for cid in picked:
            cl = by_id[cid]
            sw = round_sw[cid]
            g = strat.group(assigned[cid]) if strat.grouped else None
            nbytes = agg.num_elements(_rolex.download_key(sw)) * elsize
            bytes_down[cl.tier] = bytes_down.get(cl.tier, 0) + nbytes
            if cid in dropped:
                continue
            _load_flat(wparams, agg, _rolex.to_local(agg, state[g], sw))
            if travel:  # the server's statistics of every width <= p_max (fresh where it has none)
                _fjord_bn.load_rows(work, bn_state, strat.bn_switches(sw), fresh_missing=True)
            gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, r, cid, 7]).integers(2 ** 62)))
            pyrng = random.Random(hash((seed, r, cid)) & 0xFFFFFFFF)
            try:  # a client whose training fails (any exception, a NaN loss) is dropped, the round goes on
                with _fp.client_rng(seed, r, cid):  # dropout layers draw from the (seed, round, client) stream
                    _local_train(work, Xtr, Ytr, cl.indices, sw, strat, local_epochs, lr_r, batch_size, momentum,
                                 weight_decay, gen, pyrng, augment=augment)
                u = ClientUpdate(cid, sw, _rolex.from_local(agg, agg.flatten(wparams), sw), float(len(cl.indices)))
                if travel:
                    u.stats = _fjord_bn.read_rows(work, strat.bn_switches(sw))
            except Exception as exc:  # noqa: BLE001
                why = _validate.failure_reason(exc)
                dropped.append(cid)
                drop_reasons.append((cid, why))
                log(f"round {r}: client {cid} dropped: {why}")
                work.load_state_dict(net.state_dict())  # buffers the failed step may have spoiled
                continue
            if fault_fn is not None:
                u = fault_fn(r, u)
                if u is None:
                    dropped.append(cid)
                    continue
            vals = getattr(u, "values", None)
            bytes_up[cl.tier] = bytes_up.get(cl.tier, 0) + (
                vals.numel() * vals.element_size() if isinstance(vals, torch.Tensor)
                else agg.num_elements(sw) * elsize)
            # a ClientUpdate of this client; sample counts against what the server assigned;
            # optional clipping of the change
            u, why = _validate.screen(u, agg, state[g], float(len(cl.indices)), max_update_norm, client=cid)
            if why is not None:
                screened.append((cid, why))
                log(f"round {r}: rejected update of client {cid}: {why}")
                continue
            updates_by_group[g].append(u)
        accepted, rejected = [], list(screened)
        notes = []
        for g in groups:
            ups = updates_by_group[g]
            if strat.grouped and not ups:
                continue
            new, rep = strat.aggregate(agg, agg.unflatten(state[g]), ups, round_sw,
                                       lambda m: log(f"round {r}: {m}"))
            state[g] = agg.flatten(new).clone()
            accepted += rep.accepted
            rejected += rep.rejected
        if travel:  # FjORD's per-width average of the accepted clients' statistics
            ok = set(accepted)
            bn_state = _fjord_bn.average(
                bn_state, [(max(b for _, b in _rolex.train_switch(u.switch).branches), float(u.num_samples), u.stats)
                           for ups in updates_by_group.values() for u in ups
                           if u.client in ok and u.stats is not None], strat.widths, _fjord_bn.row_shapes(net))
        _rolex.forget_rounds(agg, r + 1)  # FedRolex's layouts of this round are not used again
        if not accepted:
            notes.append("nobody returned a valid update: the model is left unchanged")
            log(f"round {r}: {notes[-1]}")
        acc, tier_acc = ({}, {})
        if (r + 1) % eval_every == 0 or r == rounds - 1:
            acc, tier_acc = evaluate_all()
        rec = RoundRecord(r, acc, tier_acc, bytes_down, bytes_up, time.perf_counter() - t0, picked,
                          sorted(accepted), rejected, sorted(dropped), "; ".join(notes),
                          dropped_reasons=sorted(drop_reasons))
        history.rounds.append(rec)
        if tier_acc:
            log(f"round {r}: " + ", ".join(f"{t} {a:.3f}" for t, a in tier_acc.items()))
        if checkpoint is not None:
            _fp.save_checkpoint({"round": r + 1, "fingerprint": fp, "run": json.dumps(run_desc),
                                 "format": _fp.FORMAT, "history": history.to_dict(),
                                 "bn": _fjord_bn.to_checkpoint(bn_state),
                          "state": {("__none__" if g is None else str(g)): t for g, t in state.items()}},
                         checkpoint)
        if bar is not None:
            bar.update(1)
            if tier_acc:
                bar.set_postfix({t[:12]: f"{a:.3f}" for t, a in tier_acc.items()})
    if bar is not None:
        bar.close()
    # grouped: keep every group's model (each calibrated for its own switches) in the history
    if strat.grouped:
        for g in groups:
            _load_flat(params, agg, state[g])
            _calibrate(net, Xc, Yc, [s for s in eval_switches if strat.group(s) == g], eval_batch_size,
                       calib_batches)
            history.models[str(g)] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                      for k, v in net.state_dict().items()}
    # leave net with the final weights and calibrated statistics for every evaluated switch
    g_final = groups[-1] if not strat.grouped else strat.group(max(eval_switches, key=lambda s: (
        max(b for _, b in s.branches), str(s))))
    _load_flat(params, agg, state[g_final])
    sws = [s for s in eval_switches if not strat.grouped or strat.group(s) == g_final]
    bn_stats(sws)
    return history
