"""slimkern's Flower ``ServerApp`` and ``ClientApp`` (Message API, flwr 1.41).

``server_app``: builds the experiment from the run config (``slimkern.fl.flower.config``),
a ``slimkern.fl.server.Server`` over it, and runs ``SlimkernStrategy`` for ``rounds``
rounds with ``timeout`` seconds per round. With ``out-dir`` set it writes, atomically,
``final.pt`` (the model's ``state_dict``, BN statistics calibrated for every evaluated
switch; load with ``torch.load(weights_only=True)``) and ``history.json`` (the round
records as ``simulate`` returns them, the measured wire bytes per tier and the seconds
per round).

``client_app``: answers the server's ``query`` with its ``node_config["partition-id"]``,
and a ``train`` message by running ``slimkern.fl.client.train_task`` -- the function
``simulate`` runs -- on that client's samples. A task addressed to another client id is
refused (an error reply, which the server logs as a drop).
"""
from __future__ import annotations

import json
import os
from logging import INFO

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from slimkern.fl.client import train_task
from slimkern.fl.flower import codec
from slimkern.fl.flower.config import build, from_run_config
from slimkern.fl.flower.strategy import SlimkernStrategy
from slimkern.fl.server import Server

__all__ = ["server_app", "client_app", "run_server"]

server_app = ServerApp()
client_app = ClientApp()


def _flwr_log(level, msg):
    from flwr.common import log
    log(level, "%s", msg)


def _threads(run_config) -> None:
    """torch's CPU threads from the run config, set before anything computes: the result of a
    float reduction depends on how it is split over threads (the data split's normalisation
    included), so every process of a run -- and ``simulate`` -- must use the same count."""
    torch.set_num_threads(int(from_run_config(run_config)["threads"]))


def _atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_server(grid: Grid, run_config) -> SlimkernStrategy:
    """The ServerApp's work (module docstring); returns the finished strategy."""
    import io
    _threads(run_config)
    setup = build(run_config)
    cfg = setup.cfg
    net = setup.net()
    kw = setup.simulate_kwargs()
    server = Server(net, setup.rule(), setup.clients, train_labels=setup.train[1],
                    input_shape=setup.train[0].shape[1:], test_set=setup.test, **kw)
    strategy = SlimkernStrategy(server, timeout=cfg["timeout"], log=_flwr_log)
    initial = ArrayRecord({n: Array(p.detach().numpy().copy()) for n, p in net.named_parameters()})
    strategy.start(grid, initial_arrays=initial, num_rounds=cfg["rounds"], timeout=cfg["timeout"])
    models = server.finish()
    if cfg["out-dir"]:
        out = cfg["out-dir"]
        os.makedirs(out, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"model": net.state_dict(), "groups": models}, buf)
        _atomic(os.path.join(out, "final.pt"), buf.getvalue())
        from dataclasses import asdict
        hist = {"tiers": {t: str(s) for t, s in server.tier_eval.items()},
                "rounds": [asdict(r) for r in strategy.records], "wire": strategy.wire,
                "round_seconds": strategy.round_seconds, "config": cfg}
        _atomic(os.path.join(out, "history.json"), json.dumps(hist, indent=1).encode())
    return strategy


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def _partition(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("this supernode has no integer node-config 'partition-id' "
                         "(start it with --node-config 'partition-id=N num-partitions=M')") from None


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"partition-id": _partition(context)})}), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    pid = _partition(context)
    task = codec.decode_task(msg.content)
    if task.client != pid:
        raise ValueError(f"this node holds partition {pid}, the task is for client {task.client}")
    _threads(context.run_config)
    setup = build(context.run_config)
    client = setup.clients[pid]
    model = setup.net()
    u = train_task(model, task, setup.train[0], setup.train[1], client.indices, setup.augment)
    _flwr_log(INFO, f"client {pid}: round {task.round}, trained {task.key} on {len(client.indices)} samples")
    return Message(codec.encode_reply(u), reply_to=msg)
