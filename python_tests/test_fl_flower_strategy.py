"""SlimkernStrategy in process, with a fake Grid: every kind of bad reply is a logged
rejection or drop, never an exception, and the good replies aggregate exactly as the
server round object aggregates them without Flower."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from slimkern.fl.client import train_task  # noqa: E402
from slimkern.fl.flower import codec  # noqa: E402
from slimkern.fl.flower.config import build  # noqa: E402
from slimkern.fl.flower.strategy import SlimkernStrategy  # noqa: E402
from slimkern.fl.server import Server  # noqa: E402

from fl_fixtures import torch_threads  # noqa: E402

NODES = {101: 0, 102: 1, 103: 2}  # node id -> partition id
CFG = {"clients": 3, "tiers": "full=1.0:0.34,small=0.5:0.33,two=[0.5,0.5]:0.33", "rounds": 6, "channels": "4,8,8",
       "batch-size": 32, "lr": 0.1, "seed": 5, "calib-batches": 1, "strategy": "paradis", "eval-every": 6}


@pytest.fixture(autouse=True)
def flower_identity():
    """Flower creates messages only inside a run (``TaskIdentity`` holds the run id): set one
    for the test and put the previous values back."""
    saved = {k: TaskIdentity.__dict__.get(k) for k in ("_run_id", "_task_id", "_node_id")}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    with torch_threads(1):
        yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


class FakeGrid:
    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        return [Message(RecordDict({"config": ConfigRecord({"partition-id": NODES[m.metadata.dst_node_id]})}),
                        reply_to=m) for m in messages]


def _reply(msg, content=None, error=None):
    return Message(error, reply_to=msg) if error is not None else Message(content, reply_to=msg)


def test_every_bad_reply_is_rejected_or_dropped_never_raised():
    setup = build(CFG)
    kw = setup.simulate_kwargs()

    def server():
        net = setup.net()
        return net, Server(net, setup.rule(), setup.clients, train_labels=setup.train[1],
                           input_shape=setup.train[0].shape[1:], test_set=setup.test, **kw)

    net, srv = server()
    ref_net, ref = server()  # the same rounds without Flower, fed only the good replies
    strat = SlimkernStrategy(srv, timeout=5.0)
    logs = []
    srv.log = logs.append
    grid = FakeGrid()
    faults = ["none", "unreadable", "wrong-length", "nan", "error", "missing"]
    for r, fault in enumerate(faults, start=1):
        msgs = list(strat.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
        assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(NODES)
        plan = ref.begin_round(r - 1)
        replies, good = [], []
        for m in msgs:
            cid = NODES[m.metadata.dst_node_id]
            task = codec.decode_task(m.content)
            assert task.client == cid and torch.equal(task.values, plan.tasks[cid].values)
            u = train_task(setup.net(), task, *setup.train, setup.clients[cid].indices)
            content = codec.encode_reply(u)
            if cid == 2 and fault != "none":
                if fault == "unreadable":
                    content = RecordDict({"config": ConfigRecord({"client": 2})})
                elif fault == "wrong-length":
                    content.array_records["arrays"]["values"] = Array(np.zeros(7, dtype=np.float32))
                elif fault == "nan":
                    content.array_records["arrays"]["values"] = Array(np.full(u.values.numel(), np.nan, np.float32))
                elif fault == "error":
                    replies.append(_reply(m, error=Error(code=0, reason="ClientApp crashed: boom")))
                    continue
                elif fault == "missing":
                    continue
            else:
                good.append((cid, u))
            replies.append(_reply(m, content))
        if fault == "nan":  # a second reply from the same node is ignored, not counted twice
            replies.append(replies[0])
        arrays, metrics = strat.aggregate_train(r, replies)
        rec = strat.records[-1]
        want = ref.finish_round(plan, good)
        assert rec.accepted == want.accepted == ([0, 1, 2] if fault == "none" else [0, 1]), (fault, rec)
        for g in srv.groups:
            assert torch.equal(srv.state[g], ref.state[g]), fault
        flat = torch.cat([torch.from_numpy(arrays[n].numpy()).reshape(-1) for n in srv.agg.shapes])
        assert torch.equal(flat, srv.state[None])
        assert metrics["accepted"] == len(rec.accepted)
        why = dict(rec.rejected) | dict(rec.dropped_reasons)
        expect = {"none": None, "unreadable": "cannot be read", "wrong-length": "flat vector of",
                  "nan": "non-finite", "error": "replied with an error: ClientApp crashed: boom",
                  "missing": "no reply within the timeout"}[fault]
        if expect is None:
            assert not why
        else:
            assert expect in why[2], (fault, why)
            assert any(expect in line for line in logs), fault
        assert (2 in rec.dropped) == (fault in ("error", "missing"))
    assert rec.tier_accuracy == ref.evaluate()[1]  # evaluated per tier on the server


def test_codec_round_trips_keys_bn_rows_and_counts_payload_bytes():
    from slimkern import Switch
    from slimkern.fl.aggregate import ClientUpdate
    from slimkern.fl.client import Task
    from slimkern.fl.rolex import SubModel
    from slimkern.fl.strategy import FjORD
    rows = {Switch([0.5]): {"features.1": (torch.randn(8), torch.rand(8))}}
    key = SubModel(Switch([0.5]), 3, 0.25, 1.0, (2, 0, 7))
    task = Task(4, 3, key, torch.randn(123), FjORD(kd=True, bn="travel"), 0.05, 9, 2, 8, 0.5, 1e-4, rows)
    rec = codec.encode_task(task)
    back = codec.decode_task(rec)
    assert back.key == key and back.key.labels == (0, 2, 7) and torch.equal(back.values, task.values)
    assert repr(back.rule) == repr(task.rule) and (back.lr, back.seed, back.local_epochs, back.batch_size) == \
        (0.05, 9, 2, 8) and (back.momentum, back.weight_decay) == (0.5, 1e-4)
    (sw, per), = back.bn_rows.items()
    assert sw == Switch([0.5]) and all(torch.equal(a, b) for a, b in zip(per["features.1"], rows[sw]["features.1"]))
    assert codec.payload_bytes(rec.array_records["arrays"]) == 123 * 4
    assert codec.data_bytes(rec.array_records["arrays"]) == 123 * 4 + 128  # the .npy header
    u = ClientUpdate(4, key, torch.randn(50), 17.0, stats=rows)
    v, why = codec.decode_reply(codec.encode_reply(u))
    assert why is None and v.client == 4 and v.switch == key and v.num_examples == 17.0
    assert torch.equal(v.values, u.values) and torch.equal(v.stats[sw]["features.1"][1], rows[sw]["features.1"][1])
    with pytest.raises(ValueError, match="not a slimkern task"):
        codec.decode_task(RecordDict({"config": ConfigRecord({"client": 1})}))
