"""The server side of a federated round, free of any transport.

``Server`` holds the shared model's state (the flat vector of its trainable parameters;
one per group for a grouped rule) and runs the server's half of every round:

  1. ``begin_round(r)``: picks ``clients_per_round`` clients (seeded by ``(seed, r)``),
     draws the simulated drop-outs, asks the rule for each client's key this round
     (``Rule.task``: a switch, or a ``SubModel`` of index sets / label split) and builds
     each client's ``slimkern.fl.client.Task`` -- the sliced parameters of its key (only
     those elements travel: bytes down = elements x element size), lr, seed, the rule.
     Returns a ``RoundPlan``.
  2. the transport (``simulate``'s loop, a Flower ServerApp) carries each task to its
     client, which runs ``slimkern.fl.client.train_task`` and replies with a ``ClientUpdate``.
  3. ``finish_round(plan, replies, dropped, dropped_reasons)``: validates every reply
     (``slimkern.fl.validate.screen``: a ``ClientUpdate`` of the client that sent it, a sane
     sample count, optional clipping of the change), aggregates with the rule's formula
     (whose own checks reject the rest; a bad reply is a logged rejection, never an
     exception), averages travelled BN statistics (FjORD ``bn="travel"``), calls the
     ``server_step`` extension point, evaluates every ``eval_every`` rounds and returns the
     round's ``RoundRecord``.
  4. ``finish()`` leaves the model with the final weights and calibrated BN statistics and
     returns every group's model (grouped rules).

Evaluation: the server recomputes the BN statistics of each evaluated switch on its own
data (``calib_set``; BN statistics never travel, except FjORD's with ``bn="travel"``) and
measures top-1 accuracy on ``test_set`` for every switch in use and per tier.

Extension points
----------------
(a) ``server_step``: any callable ``server_step(model, replies, round_index) -> dict[str,
    float]`` given to ``Server`` (or ``simulate(..., server_step=...)``). It is called once a
    round, after aggregation and before evaluation, with ``model`` = the shared model
    holding the freshly aggregated parameters (the user's ``net``; BN statistics are
    whatever it holds -- calibrate with ``slimkern.calibrate_bn`` if you run it in eval
    mode) and ``replies`` = the validated client replies of the round (``ClientUpdate``:
    ``client`` id, ``switch`` -- the key the client trained, a ``Switch`` or a ``SubModel``
    whose ``.switch`` is the prefix switch it ran --, ``num_examples``, ``values`` -- its
    trained, sliced parameters, flat in ``Aggregator.layout(switch)`` order). It may change
    ``model``'s parameters in place (FedDF distils into it): they are read back into the
    server state. Its metrics are merged into ``RoundRecord.metrics`` and its time is
    ``RoundRecord.server_time`` (and inside ``wall_time``). A grouped rule calls it once per
    group that got replies, with that group's model and replies; the metric names are then
    prefixed ``"<group>/"``. ``reply_model(model, reply)`` is the shared model with one
    client's trained parameters loaded, running at the client's switch (FedDF's teachers).
(b) a new rule: one ``Rule`` subclass in ``slimkern/fl/rules/<name>.py`` and one line in
    ``slimkern.fl.rules.REGISTRY`` (see ``slimkern/fl/rules/__init__.py``); ``simulate``,
    the CLI's ``--strategy`` and the Flower apps then know it by name.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from slimkern.fl import budget as _budget
from slimkern.fl import fingerprint as _fp
from slimkern.fl import fjord_bn as _fjord_bn
from slimkern.fl import rolex as _rolex
from slimkern.fl import validate as _validate
from slimkern.fl.aggregate import Aggregator, ClientUpdate
from slimkern.fl.client import Task, as_tensors, client_aggregator
from slimkern.fl.rules import get_rule

__all__ = ["Server", "RoundPlan", "RoundRecord", "reply_model", "client_labels", "ServerStep"]

logger = logging.getLogger("slimkern.fl")

ServerStep = Callable[[torch.nn.Module, list, int], Mapping[str, float]]


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
    metrics: dict[str, float] = field(default_factory=dict)  # server_step's metrics
    server_time: float = 0.0            # seconds spent in server_step


@dataclass
class RoundPlan:
    """What ``begin_round`` decided: the picked clients, those that will not return
    (simulated drop-out), every picked client's key and the tasks of the others."""
    round: int
    picked: list[int]
    dropped: list[int]
    keys: dict[int, Any]
    tasks: dict[int, Task]
    bytes_down: dict[str, int]
    lr: float
    started: float


def _flat_params(net) -> dict[str, torch.nn.Parameter]:
    return dict(net.named_parameters())


def _load_flat(params: dict, agg: Aggregator, flat: torch.Tensor) -> None:
    with torch.no_grad():
        for n, t in agg.unflatten(flat).items():
            params[n].copy_(t)


def accuracy(net, X, Y, sw, batch_size) -> float:
    """Top-1 accuracy of ``net`` at switch ``sw`` (eval mode)."""
    from slimkern.nn import use_switch
    net.eval()
    correct = 0
    with torch.no_grad(), use_switch(net, sw):
        for i in range(0, len(X), batch_size):
            correct += int((net(X[i:i + batch_size]).argmax(1) == Y[i:i + batch_size]).sum())
    return correct / max(1, len(X))


def calibrate(net, X, Y, switches, batch_size, num_batches) -> None:
    from slimkern.nn import calibrate_bn
    batches = [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    calibrate_bn(net, batches, list(switches), num_batches=min(num_batches, len(batches)))


def client_labels(clients, Y: torch.Tensor) -> dict[int, tuple | None]:
    """Per client the labels it has data for (None: every label of ``Y``), for label split."""
    all_labels = set(Y.tolist())
    out = {}
    for c in clients:
        have = set(Y[torch.as_tensor(np.asarray(c.indices), dtype=torch.long)].tolist())
        out[c.id] = None if have >= all_labels else tuple(sorted(have))
    return out


def reply_model(model: torch.nn.Module, reply: ClientUpdate, agg: Aggregator | None = None) -> torch.nn.Module:
    """A copy of ``model`` holding ``reply``'s trained parameters, set to run at the
    client's switch. Elements the client did not send (outside its key; the classifier rows
    of labels it lacks under label split) are ``model``'s current values; for a FedRolex
    key the copy is re-indexed as the client's was (its rolled sub-model in the prefix
    windows). Travelled BN rows (``reply.stats``) are loaded; other BN statistics are
    ``model``'s."""
    from slimkern.nn import set_switch
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not all(hasattr(reply, a) for a in ("client", "switch", "values", "num_samples")):
        raise TypeError(f"reply must be a ClientUpdate, got {type(reply).__name__}")
    m = copy.deepcopy(model)
    agg = agg or client_aggregator(m)
    params = _flat_params(m)
    key = reply.switch
    flat = _rolex.to_local(agg, agg.flatten(params), key).clone()
    lay = agg.layout(_rolex.local_key(key))
    vals = reply.values if isinstance(reply.values, torch.Tensor) else agg.layout(key).pack(reply.values)
    if vals.dim() != 1 or vals.numel() != lay.numel:
        raise ValueError(f"reply of client {reply.client}: {vals.numel()} values, its key {key} has {lay.numel}")
    flat[lay.index] = vals.detach().to(flat.dtype)
    _load_flat(params, agg, flat)
    if reply.stats:
        _fjord_bn.load_rows(m, reply.stats)
    set_switch(m, _rolex.train_switch(key))
    return m


def _check_metrics(out, where: str) -> dict[str, float]:
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(f"{where} must return a dict[str, float], got {type(out).__name__}")
    bad = [k for k, v in out.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, numbers.Real)]
    if bad:
        raise TypeError(f"{where} must return a dict[str, float]; bad entries: {bad[:3]}")
    return {k: float(v) for k, v in out.items()}


class Server:
    """The server's half of every round (module docstring). ``net`` is the shared model
    (its parameters are the initial state; it is the evaluation model); ``clients`` the
    ``slimkern.fl.Client`` list (ids, sample indices, tiers); ``train_labels`` the labels of
    the training set the clients' indices point into (label split); ``input_shape`` one
    input's shape (profiles for tiers given as budgets). Other arguments as ``simulate``."""

    def __init__(self, net: torch.nn.Module, rule, clients: Sequence, *, train_labels: torch.Tensor,
                 input_shape: Sequence[int], test_set=None, calib_set=None, seed: int = 0, rounds: int = 10,
                 lr: float = 0.05, lr_schedule: str = "constant", local_epochs: int = 1, batch_size: int = 32,
                 momentum: float = 0.9, weight_decay: float = 5e-4, clients_per_round: int | None = None,
                 dropout: float = 0.0, max_update_norm: float | None = None,
                 max_num_samples: float | None = _validate.MAX_NUM_SAMPLES, switch_candidates: Sequence | None = None,
                 eval_every: int = 1, eval_batch_size: int = 256, calib_batches: int = 20,
                 server_step: ServerStep | None = None, log: Callable[[str], None] | None = None):
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
        if server_step is not None and not callable(server_step):
            raise TypeError(f"server_step must be callable (model, replies, round) -> dict, got {server_step!r}")
        n_train = len(train_labels)
        for c in clients:
            idx = np.asarray(c.indices)
            if idx.size == 0 or idx.min() < 0 or idx.max() >= n_train:
                raise ValueError(f"client {c.id}: indices must be non-empty and within the {n_train} training samples")

        self.net, self.log = net, (log or logger.info)
        self.rule = get_rule(rule)
        self.seed, self.rounds, self.lr, self.lr_schedule = seed, rounds, lr, lr_schedule
        self.local_epochs, self.batch_size, self.momentum, self.weight_decay = (local_epochs, batch_size, momentum,
                                                                                weight_decay)
        self.k, self.dropout, self.max_update_norm = k, dropout, max_update_norm
        self.eval_every, self.eval_batch_size, self.calib_batches = eval_every, eval_batch_size, calib_batches
        self.server_step = server_step
        self.test = as_tensors(test_set) if test_set is not None else None
        self.calib = as_tensors(calib_set) if calib_set is not None else None

        self.params = _flat_params(net)
        # tiers given as device budgets: each one's switch chosen by assign_switch on this net's profile
        self.clients = _budget.resolve_clients(clients, net, (1, *input_shape), switch_candidates, self.log)
        self.ids = ids
        self.agg = Aggregator({n: p.shape for n, p in self.params.items()}, _rolex.windows_fn(net))
        self.agg.max_num_samples = max_num_samples
        self.elsize = next(iter(self.params.values())).element_size()
        self.by_id = {c.id: c for c in self.clients}
        self.labels = client_labels(self.clients, train_labels)
        strat = self.rule
        tier_switches = sorted({c.tier_switch for c in self.clients}, key=str)
        self.assigned = {c.id: strat.client_switch(c.tier_switch, tier_switches) for c in self.clients}
        self.tier_eval: dict[str, Any] = {}
        for c in self.clients:
            self.tier_eval.setdefault(c.tier, strat.eval_switch(self.assigned[c.id]))
        self.eval_switches = sorted(set(self.tier_eval.values()), key=str)
        self.groups = sorted({strat.group(self.assigned[i]) for i in ids}, key=str) if strat.grouped else [None]
        flat0 = self.agg.flatten(self.params).clone()
        self.initial_hash = _fp.weights_hash(flat0)
        self.state: dict[Hashable, torch.Tensor] = {g: flat0.clone() for g in self.groups}
        # FjORD(bn="travel"): the server's per-width BN statistics (switch -> bn name -> rows)
        self.travel = bool(getattr(strat, "bn_travel", False))
        self.bn_state: dict = {}

    # -- run identity and checkpoints -----------------------------------------------------
    def group_of(self, cid: int):
        return self.rule.group(self.assigned[cid]) if self.rule.grouped else None

    def fingerprint(self, augment=None) -> str:
        net_names = list(self.params)
        extra = {} if augment is None else {"augment": repr(augment)}
        desc = json.dumps({"strategy": repr(self.rule), "seed": self.seed, "params": net_names, **extra,
                           "clients": [(c.id, c.tier, str(c.tier_switch), len(c.indices),
                                        int(np.asarray(c.indices).sum())) for c in self.clients]})
        return hashlib.sha256(desc.encode()).hexdigest()[:16]

    def run_description(self, augment=None) -> dict:
        """Everything that changes the trained weights (``slimkern.fl.fingerprint``)."""
        return _fp.describe(
            strategy=self.rule, seed=self.seed, lr=self.lr, lr_schedule=self.lr_schedule, rounds=self.rounds,
            local_epochs=self.local_epochs, batch_size=self.batch_size, momentum=self.momentum,
            weight_decay=self.weight_decay, dropout=self.dropout, clients_per_round=self.k,
            max_update_norm=self.max_update_norm, max_num_samples=self.agg.max_num_samples, augment=augment,
            params=[(n, list(p.shape)) for n, p in self.params.items()], model=_fp.model_digest(self.net),
            initial_weights=self.initial_hash, clients=_fp.clients_digest(self.clients))

    def checkpoint_state(self) -> dict:
        """The server state as plain containers of tensors (``weights_only`` loadable)."""
        return {"bn": _fjord_bn.to_checkpoint(self.bn_state),
                "state": {("__none__" if g is None else str(g)): t for g, t in self.state.items()}}

    def load_checkpoint_state(self, ck: Mapping) -> None:
        from slimkern.switch import Switch
        self.state = {(None if g == "__none__" else Switch.parse(g)): t for g, t in ck["state"].items()}
        self.bn_state = _fjord_bn.from_checkpoint(ck.get("bn", {}))

    # -- one round ----------------------------------------------------------------------
    def lr_at(self, r: int) -> float:
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1 + math.cos(math.pi * r / self.rounds))

    def begin_round(self, r: int, picked: Sequence[int] | None = None) -> RoundPlan:
        """Select (or take ``picked``), assign and build the tasks of round ``r``."""
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.seed, r])
        chosen = sorted(int(i) for i in rng.choice(self.ids, size=self.k, replace=False))
        drops = rng.random(len(chosen)) < self.dropout
        dropped = [c for c, d in zip(chosen, drops) if d]
        if picked is not None:
            unknown = [c for c in picked if c not in self.by_id]
            if unknown:
                raise ValueError(f"picked clients {unknown} are not clients of this server")
            chosen, dropped = sorted(int(c) for c in picked), []
        strat = self.rule
        keys = {c: strat.task(c, self.assigned, r, self.seed, self.labels[c]) for c in chosen}
        lr_r = self.lr_at(r)
        bytes_down: dict[str, int] = {}
        tasks: dict[int, Task] = {}
        for cid in chosen:
            key = keys[cid]
            down = self.agg.layout(_rolex.download_key(key))
            tier = self.by_id[cid].tier
            bytes_down[tier] = bytes_down.get(tier, 0) + down.numel * self.elsize
            if cid in dropped:
                continue
            rows = None
            if self.travel:
                rows = {s: self.bn_state[s] for s in strat.bn_switches(key) if s in self.bn_state}
            tasks[cid] = Task(cid, r, key, self.state[self.group_of(cid)][down.index].clone(), strat, lr_r,
                              self.seed, self.local_epochs, self.batch_size, self.momentum, self.weight_decay,
                              rows)
        return RoundPlan(r, chosen, dropped, keys, tasks, bytes_down, lr_r, t0)

    def upload_bytes(self, reply, key) -> int:
        """Bytes of a reply's values (what ``simulate`` and the Flower apps account)."""
        vals = getattr(reply, "values", None)
        if isinstance(vals, torch.Tensor):
            return vals.numel() * vals.element_size()
        return self.agg.num_elements(key) * self.elsize

    def finish_round(self, plan: RoundPlan, replies: Sequence[tuple[int, Any]], dropped: Sequence[int] = (),
                     dropped_reasons: Sequence[tuple[int, str]] = (),
                     rejected: Sequence[tuple[int, str]] = ()) -> RoundRecord:
        """Validate, aggregate, run ``server_step``, evaluate: the round's record.
        ``replies``: ``(client id, reply)`` of the clients that returned something;
        ``dropped``: picked clients that did not (besides ``plan.dropped``), with
        ``dropped_reasons`` for those whose training failed or who never answered;
        ``rejected``: replies the transport already refused (unreadable), with reasons."""
        r, strat, agg, log = plan.round, self.rule, self.agg, self.log
        bytes_up: dict[str, int] = {}
        updates_by_group: dict[Hashable, list[ClientUpdate]] = {g: [] for g in self.groups}
        screened: list[tuple[int, str]] = list(rejected)  # rejected before the rule (sample counts)
        # in client order, whatever order they arrived in: float sums depend on the order of the terms
        for cid, u in sorted(replies, key=lambda item: item[0]):
            if cid not in plan.keys:
                screened.append((cid, f"client {cid} was not selected this round"))
                log(f"round {r}: rejected update of client {cid}: {screened[-1][1]}")
                continue
            cl = self.by_id[cid]
            g = self.group_of(cid)
            bytes_up[cl.tier] = bytes_up.get(cl.tier, 0) + self.upload_bytes(u, plan.keys[cid])
            # a ClientUpdate of this client; sample counts against what the server assigned;
            # optional clipping of the change
            u, why = _validate.screen(u, agg, self.state[g], float(len(cl.indices)), self.max_update_norm,
                                      client=cid)
            if why is not None:
                screened.append((cid, why))
                log(f"round {r}: rejected update of client {cid}: {why}")
                continue
            updates_by_group[g].append(u)
        accepted, rejected = [], list(screened)
        notes = []
        for g in self.groups:
            ups = updates_by_group[g]
            if strat.grouped and not ups:
                continue
            new, rep = strat.aggregate(agg, agg.unflatten(self.state[g]), ups, plan.keys,
                                       lambda m: log(f"round {r}: {m}"))
            self.state[g] = agg.flatten(new).clone()
            accepted += rep.accepted
            rejected += rep.rejected
        ok = set(accepted)
        if self.travel:  # FjORD's per-width average of the accepted clients' statistics
            self.bn_state = _fjord_bn.average(
                self.bn_state, [(max(b for _, b in _rolex.train_switch(u.switch).branches), float(u.num_samples),
                                 u.stats) for ups in updates_by_group.values() for u in ups
                                if u.client in ok and u.stats is not None], strat.widths,
                _fjord_bn.row_shapes(self.net))
        _rolex.forget_rounds(agg, r + 1)  # FedRolex's layouts of this round are not used again
        if not accepted:
            notes.append("nobody returned a valid update: the model is left unchanged")
            log(f"round {r}: {notes[-1]}")
        metrics, server_time = self._server_step(r, updates_by_group, ok)
        acc, tier_acc = ({}, {})
        if self.test is not None and ((r + 1) % self.eval_every == 0 or r == self.rounds - 1):
            acc, tier_acc = self.evaluate()
        all_dropped = sorted(set(plan.dropped) | set(dropped))
        rec = RoundRecord(r, acc, tier_acc, plan.bytes_down, bytes_up, time.perf_counter() - plan.started,
                          plan.picked, sorted(accepted), rejected, all_dropped, "; ".join(notes),
                          dropped_reasons=sorted(dropped_reasons), metrics=metrics, server_time=server_time)
        if tier_acc:
            log(f"round {r}: " + ", ".join(f"{t} {a:.3f}" for t, a in tier_acc.items()))
        return rec

    def _server_step(self, r, updates_by_group, ok) -> tuple[dict[str, float], float]:
        if self.server_step is None:
            return {}, 0.0
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        for g in self.groups:
            replies = [u for u in updates_by_group[g] if u.client in ok]
            if self.rule.grouped and not replies:
                continue
            _load_flat(self.params, self.agg, self.state[g])
            out = _check_metrics(self.server_step(self.net, replies, r), "server_step")
            self.state[g] = self.agg.flatten(self.params).clone()
            metrics.update({(k if g is None else f"{g}/{k}"): v for k, v in out.items()})
        return metrics, time.perf_counter() - t0

    # -- evaluation ---------------------------------------------------------------------
    def bn_stats(self, sws) -> None:
        """BN statistics of ``sws`` in the model: the travelled ones, else calibrated on server data."""
        if self.travel:
            sws = _fjord_bn.load_for_eval(self.net, self.bn_state, sws)
        if sws:
            if self.calib is None:
                raise ValueError("the server needs calib_set to compute BN statistics")
            calibrate(self.net, *self.calib, sws, self.eval_batch_size, self.calib_batches)

    def evaluate(self) -> tuple[dict[str, float], dict[str, float]]:
        """``(switch notation -> top-1, tier -> top-1)`` on ``test_set``."""
        if self.test is None:
            raise ValueError("the server has no test_set to evaluate on")
        strat = self.rule
        acc: dict[str, float] = {}
        for g in self.groups:
            sws = [s for s in self.eval_switches if not strat.grouped or strat.group(s) == g]
            if not sws:
                continue
            _load_flat(self.params, self.agg, self.state[g])
            self.bn_stats(sws)
            for s in sws:
                acc[str(s)] = accuracy(self.net, *self.test, s, self.eval_batch_size)
        return acc, {t: acc[str(s)] for t, s in self.tier_eval.items()}

    def finish(self) -> dict[str, dict[str, torch.Tensor]]:
        """Leaves the model with the final weights (for a grouped rule, those of the group of
        the widest tier) and BN statistics for every evaluated switch; returns every group's
        model (grouped rules; each calibrated for its own switches), else ``{}``."""
        strat, models = self.rule, {}
        if strat.grouped:
            for g in self.groups:
                _load_flat(self.params, self.agg, self.state[g])
                calibrate(self.net, *self.calib, [s for s in self.eval_switches if strat.group(s) == g],
                          self.eval_batch_size, self.calib_batches)
                models[str(g)] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                  for k, v in self.net.state_dict().items()}
        g_final = self.groups[-1] if not strat.grouped else strat.group(max(self.eval_switches, key=lambda s: (
            max(b for _, b in s.branches), str(s))))
        _load_flat(self.params, self.agg, self.state[g_final])
        self.bn_stats([s for s in self.eval_switches if not strat.grouped or strat.group(s) == g_final])
        return models
