"""In-process federated simulation over clients of different capacity.

``simulate`` is a loop, in one process, over the transport-free round object
``slimkern.fl.server.Server`` (select, assign, build tasks, validate, aggregate, evaluate)
and the client function ``slimkern.fl.client.train_task`` -- the very objects the Flower
apps (``slimkern.fl.flower``) call. One round:
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
import json
import logging
import os
import re
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from slimkern.fl.aggregate import ClientUpdate
from slimkern.fl.partition import partition as _partition
from slimkern.fl import batched as _batched
from slimkern.fl import fingerprint as _fp
from slimkern.fl import validate as _validate
from slimkern.fl.client import as_tensors as _as_tensors, client_aggregator, local_train as _local_train, train_task
from slimkern.fl.server import RoundRecord, Server, ServerStep, accuracy as _accuracy

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
             switch_candidates: Sequence | None = None, server_step: ServerStep | None = None,
             client_batching: bool = False, log: Callable[[str], None] | None = None) -> History:
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
        server_step: ``server_step(model, replies, round_index) -> dict[str, float]``, called
            after aggregation every round (FedDF distillation, OT fusion, ...): the extension
            point documented in ``slimkern.fl.server``; its metrics land in
            ``RoundRecord.metrics``, its time in ``RoundRecord.server_time``.
        client_batching: train the clients that run the same switch together, one batched
            pass per local step (``slimkern.fl.batched``: stacked weights, grouped convolutions,
            per-client BN statistics and SGD); equal to the one-by-one clients to float
            rounding, not bit for bit. Where it cannot be exact (a rule with custom client
            hooks, travelling BN statistics, modules not known to act per sample, ...) the
            clients train one by one and the log says why. Off by default: the one-by-one
            clients are bit-identical to a Flower ClientApp's.
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
    if checkpoint is None and resume:
        raise ValueError("resume=True needs a checkpoint path")
    log = log or logger.info
    Xtr, Ytr = _as_tensors(train_set)
    server = Server(net, strategy, clients, train_labels=Ytr, input_shape=Xtr.shape[1:], test_set=test_set,
                    calib_set=calib_set if calib_set is not None else (Xtr, Ytr), seed=seed, rounds=rounds, lr=lr,
                    lr_schedule=lr_schedule, local_epochs=local_epochs, batch_size=batch_size, momentum=momentum,
                    weight_decay=weight_decay, clients_per_round=clients_per_round, dropout=dropout,
                    max_update_norm=max_update_norm, max_num_samples=max_num_samples,
                    switch_candidates=switch_candidates, eval_every=eval_every, eval_batch_size=eval_batch_size,
                    calib_batches=calib_batches, server_step=server_step, log=log)
    fp, run_desc = server.fingerprint(augment), server.run_description(augment)
    history = History(tiers={t: str(s) for t, s in server.tier_eval.items()})
    start = 0
    if resume and os.path.exists(checkpoint):
        ck = _fp.load_checkpoint(checkpoint)  # torch.load(weights_only=True)
        _fp.check(ck, run_desc, checkpoint)  # ValueError naming every field that differs
        server.load_checkpoint_state(ck)
        history = History.from_dict(ck["history"])
        start = ck["round"]
        log(f"resuming from {checkpoint} at round {start}")

    work = copy.deepcopy(net)  # the clients' working copy
    work_agg = client_aggregator(work)
    batcher = None
    if client_batching:
        why = _batched.unsupported_reason(net, server.rule)
        if why is None:
            batcher = _batched.ClientBatcher(work, server.rule, work_agg)
        else:
            log(f"client batching off: {why}; the clients train one by one")
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=rounds, initial=start, desc=f"fl {server.rule.name}", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    for r in range(start, rounds):
        plan = server.begin_round(r)
        replies, dropped, reasons = [], [], []
        batched: dict = {}
        if batcher is not None:
            try:
                batched, _ = batcher.train(list(plan.tasks.values()), Xtr, Ytr,
                                           {cid: server.by_id[cid].indices for cid in plan.tasks}, augment)
            except Exception as exc:  # noqa: BLE001 - the clients still train, one by one
                batched = {}
                log(f"round {r}: client batching failed ({_validate.failure_reason(exc)}); "
                    "the clients train one by one")
            for why in dict.fromkeys(batcher.reasons):
                log(f"round {r}: some clients train one by one: {why}")
        for cid, task in plan.tasks.items():
            try:  # a client whose training fails (any exception, a NaN loss) is dropped, the round goes on
                u = batched.get(cid)
                if isinstance(u, BaseException):
                    raise u
                if u is None:
                    u = train_task(work, task, Xtr, Ytr, server.by_id[cid].indices, augment, work_agg)
            except Exception as exc:  # noqa: BLE001
                why = _validate.failure_reason(exc)
                dropped.append(cid)
                reasons.append((cid, why))
                log(f"round {r}: client {cid} dropped: {why}")
                work.load_state_dict(net.state_dict())  # buffers the failed step may have spoiled
                continue
            if fault_fn is not None:
                u = fault_fn(r, u)
                if u is None:
                    dropped.append(cid)
                    continue
            replies.append((cid, u))
        rec = server.finish_round(plan, replies, dropped, reasons)
        history.rounds.append(rec)
        if checkpoint is not None:
            _fp.save_checkpoint({"round": r + 1, "fingerprint": fp, "run": json.dumps(run_desc),
                                 "format": _fp.FORMAT, "history": history.to_dict(), **server.checkpoint_state()},
                                checkpoint)
        if bar is not None:
            bar.update(1)
            if rec.tier_accuracy:
                bar.set_postfix({t[:12]: f"{a:.3f}" for t, a in rec.tier_accuracy.items()})
    if bar is not None:
        bar.close()
    history.models.update(server.finish())
    return history
