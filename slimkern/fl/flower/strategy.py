"""A Flower Message-API ``Strategy`` that runs any slimkern rule through ``slimkern.fl.server.Server``.

Flower's own ``FedAvg`` expects every reply to carry the same arrays and adds them in place;
replies of different widths crash it. ``SlimkernStrategy`` instead hands each round to the
transport-free round object ``simulate`` uses:

* ``configure_train``: on the first call it asks every connected node for its
  ``partition-id`` (a ``query`` message) to map client ids to node ids. Then
  ``Server.begin_round`` picks the round's clients and builds their tasks, and each node
  receives only its client's task: the sliced parameters of the switch (or FedRolex
  sub-model) it trains this round, plus switch, round, lr, seed and the rule in the config
  (``slimkern.fl.flower.codec``). A picked client that no node holds is logged as missing.
* ``aggregate_train``: every reply is decoded and validated (``Server.finish_round``:
  unreadable replies, wrong client, bad sample counts, wrong shapes, NaN/inf are rejections
  with a logged reason, never an exception); a node that answered with an error is dropped
  with Flower's reason; a node that did not answer within ``timeout`` is logged as missing
  and the round completes without it. Then slimkern's aggregator runs, and the server
  evaluates per tier on its own data. Returns the full parameters and the round's metrics.
* evaluation runs on the server (``Server.evaluate``, per tier): ``configure_evaluate``
  sends nothing.

Bytes on the wire are measured from the ArrayRecords sent and received
(``codec.payload_bytes``): ``wire[r] = {"down": {tier: bytes}, "up": {tier: bytes}}``,
the same element bytes ``simulate`` accounts in ``RoundRecord.bytes_down/up``.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from slimkern.fl.flower import codec
from slimkern.fl.server import RoundRecord, Server

__all__ = ["SlimkernStrategy"]


def _flwr():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import Strategy
    return Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict, Strategy


def _base():
    return _flwr()[-1]


class SlimkernStrategy(_base()):
    """``SlimkernStrategy(server, timeout=600)``: ``server`` a ``slimkern.fl.server.Server``
    (module docstring); ``timeout`` the seconds a round waits for replies (also the query's)."""

    def __init__(self, server: Server, timeout: float = 600.0, log=None):
        if not isinstance(server, Server):
            raise TypeError(f"server must be a slimkern.fl.server.Server, got {type(server).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.server, self.timeout = server, float(timeout)
        self._log = log
        self.nodes: dict[int, int] = {}      # client id -> node id
        self.records: list[RoundRecord] = []
        self.wire: list[dict] = []           # per round: measured payload bytes per tier
        self.round_seconds: list[float] = []
        self._plan = None
        self._sent: dict[int, int] = {}      # node id -> client id of this round
        self._missing: list[tuple[int, str]] = []
        self._t0 = 0.0

    def log(self, level: int, msg: str) -> None:
        self.server.log(msg)
        if self._log is not None:
            self._log(level, msg)

    # -- client ids <-> nodes ------------------------------------------------------------
    def discover(self, grid) -> dict[int, int]:
        """Asks every connected node for its ``partition-id``: ``{client id: node id}``."""
        _, _, ConfigRecord, Message, MessageType, _, RecordDict, _ = _flwr()
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=int(n),
                        message_type=MessageType.QUERY) for n in grid.get_node_ids()]
        for rep in grid.send_and_receive(msgs, timeout=self.timeout):
            nid = rep.metadata.src_node_id
            if rep.has_error():
                self.log(WARNING, f"node {nid} did not say its partition: {rep.error.reason}")
                continue
            try:
                pid = int(rep.content.config_records["config"]["partition-id"])
            except (KeyError, TypeError, ValueError) as exc:
                self.log(WARNING, f"node {nid} sent no partition-id ({exc})")
                continue
            if pid in self.nodes:
                self.log(WARNING, f"nodes {self.nodes[pid]} and {nid} both hold partition {pid}; keeping the first")
                continue
            self.nodes[pid] = nid
        self.log(INFO, f"{len(self.nodes)} nodes: " + ", ".join(f"client {c} -> node {n}"
                                                               for c, n in sorted(self.nodes.items())))
        return self.nodes

    # -- training ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays, config, grid) -> Iterable:
        _, _, _, Message, MessageType, _, _, _ = _flwr()
        self._t0 = time.perf_counter()
        if not self.nodes:
            self.discover(grid)
        plan = self.server.begin_round(server_round - 1)
        self._plan, self._sent, self._missing = plan, {}, []
        down: dict[str, int] = {}
        msgs = []
        for cid, task in plan.tasks.items():
            nid = self.nodes.get(cid)
            if nid is None:
                self._missing.append((cid, "no connected node holds this client's partition"))
                self.log(WARNING, f"round {plan.round}: client {cid} missing: {self._missing[-1][1]}")
                continue
            content = codec.encode_task(task)
            tier = self.server.by_id[cid].tier
            down[tier] = down.get(tier, 0) + codec.payload_bytes(content.array_records["arrays"])
            msgs.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN,
                                group_id=str(server_round)))
            self._sent[nid] = cid
        self.wire.append({"down": down, "up": {}})
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable):
        Array, ArrayRecord, _, _, _, MetricRecord, _, _ = _flwr()
        plan, server = self._plan, self.server
        if plan is None or plan.round != server_round - 1:
            raise RuntimeError(f"aggregate_train of round {server_round} without its configure_train")
        got, ok, dropped, reasons, rejected = set(), [], [], list(self._missing), []
        dropped += [c for c, _ in self._missing]
        up = self.wire[-1]["up"]
        for msg in replies:
            nid = msg.metadata.src_node_id
            cid = self._sent.get(nid)
            if cid is None or cid in got:
                self.log(WARNING, f"round {plan.round}: ignored a reply from node {nid} (no task of this round)")
                continue
            got.add(cid)
            if msg.has_error():
                dropped.append(cid)
                why = " ".join(str(msg.error.reason).split())[:300]
                reasons.append((cid, f"the node replied with an error: {why}"))
                self.log(WARNING, f"round {plan.round}: client {cid} dropped: {reasons[-1][1]}")
                continue
            u, why = codec.decode_reply(msg.content)
            if u is None:
                rejected.append((cid, why))
                self.log(WARNING, f"round {plan.round}: rejected update of client {cid}: {why}")
                continue
            tier = server.by_id[cid].tier
            up[tier] = up.get(tier, 0) + codec.payload_bytes(msg.content.array_records["arrays"])
            ok.append((cid, u))
        for nid, cid in self._sent.items():
            if cid not in got:
                dropped.append(cid)
                reasons.append((cid, f"no reply within the timeout ({self.timeout:g} s): missing"))
                self.log(WARNING, f"round {plan.round}: client {cid} (node {nid}) dropped: {reasons[-1][1]}; "
                                  "the round goes on without it")
        rec = server.finish_round(plan, ok, dropped, reasons, rejected)
        self.records.append(rec)
        self.round_seconds.append(time.perf_counter() - self._t0)
        self._plan = None
        flat = server.state[server.groups[-1]]
        arrays = ArrayRecord({n: Array(t.detach().numpy().copy()) for n, t in server.agg.unflatten(flat).items()})
        metrics = {f"top1/{t}": a for t, a in rec.tier_accuracy.items()}
        metrics.update({"accepted": len(rec.accepted), "rejected": len(rec.rejected), "dropped": len(rec.dropped)})
        metrics.update({f"metric/{k}": v for k, v in rec.metrics.items()})
        self.log(INFO, f"round {plan.round}: accepted {rec.accepted}, rejected {rec.rejected}, dropped {rec.dropped}"
                       + (", " + ", ".join(f"{t} {a:.3f}" for t, a in rec.tier_accuracy.items())
                          if rec.tier_accuracy else ""))
        return arrays, MetricRecord(metrics)

    # -- evaluation happens on the server, in aggregate_train ---------------------------
    def configure_evaluate(self, server_round: int, arrays, config, grid) -> Iterable:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable):
        return None

    def summary(self) -> None:
        s = self.server
        self.log(INFO, f"SlimkernStrategy: rule {s.rule!r}, {len(s.clients)} clients, {s.k} per round, "
                       f"tiers {dict((t, str(sw)) for t, sw in s.tier_eval.items())}, timeout {self.timeout:g} s")
