"""slimkern on a real Flower deployment (issue 14, part 1): superlink + 3 supernodes on 127.0.0.1.

Every test starts its own superlink (free ports) and supernodes in a temporary FLWR_HOME,
runs ``flwr run`` on an app written by ``slimkern.fl.flower.generate.write_app`` and
compares what the ServerApp wrote with ``simulate`` on the same experiment (same seed,
same clients from ``slimkern.fl.flower.config.build``). Everything started is stopped by
PID in the fixture's teardown: each process is started in its own session, and every
process of those sessions -- the supernodes' ``flower-superexec`` children included, which
outlive their parents -- is found in /proc and killed by its PID.

The comparison is bit-identical (``torch.equal``): the Flower client trains on exactly the
sliced values ``simulate``'s client receives (float32 through NumPy's ``.npy`` unchanged),
with the same (seed, round, client) generators, one thread each.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the flower extra is not installed")

from slimkern.fl import simulate  # noqa: E402
from slimkern.fl.flower.config import build  # noqa: E402
from slimkern.fl.flower.generate import write_app  # noqa: E402

from fl_fixtures import torch_threads  # noqa: E402

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
N_CLIENTS = 3
BASE = {"clients": N_CLIENTS, "tiers": "full=1.0:0.34,small=0.5:0.33,two=[0.5,0.5]:0.33", "rounds": 2,
        "channels": "8,12,12", "local-epochs": 1, "batch-size": 16, "lr": 0.1, "seed": 3, "calib-batches": 2,
        "alpha": 0.5, "timeout": 120.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """PIDs of every live process whose environment carries ``marker`` (every process this
    deployment started and all their descendants: Flower starts its superexec children in
    new sessions, and they outlive their parents, but they inherit the environment)."""
    out, needle = [], marker.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{d}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in env.split(b"\0"):
            out.append(int(d))
    return out


class Deployment:
    """A superlink and supernodes on 127.0.0.1, each in its own session (module docstring)."""

    def __init__(self, root: str):
        self.root = root
        self.home = os.path.join(root, "flwr_home")
        os.makedirs(self.home)
        self.port = _free_port()
        with open(os.path.join(self.home, "config.toml"), "w") as fh:
            fh.write('[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
                     f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.marker = f"SLIMKERN_FLOWER_TEST={os.getpid()}-{self.port}-{time.time_ns()}"
        self.env = {**os.environ, "FLWR_HOME": self.home, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                    "SLIMKERN_FLOWER_TEST": self.marker.split("=", 1)[1]}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "w")
        p = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=self.root)
        self.procs[name] = p
        return p

    def up(self, n: int = N_CLIENTS) -> None:
        self.start("superlink", [f"{BIN}/flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(self.port)])
        self.wait_port(self.port, 60)
        for i in range(n):
            self.start(f"supernode{i}", [f"{BIN}/flower-supernode", "--insecure", "--superlink",
                                         f"127.0.0.1:{self.port}", "--port", str(_free_port()),
                                         "--node-config", f"partition-id={i} num-partitions={n}"])

    def wait_port(self, port: int, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"superlink exited:\n{self.read('superlink')[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"superlink not listening on {port} after {timeout} s:\n{self.read('superlink')[-3000:]}")

    def read(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, f"{name}.log")) as fh:
                return fh.read()
        except OSError:
            return ""

    def wait_log(self, name: str, pred, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if pred(self.read(name)):
                return
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited ({self.procs[name].returncode}):\n{self.read(name)[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{name}: nothing after {timeout} s:\n{self.read(name)[-3000:]}")

    def pids(self) -> list[int]:
        return _marked_pids(self.marker)

    def descendants(self, pid: int) -> list[int]:
        """``pid`` and every live descendant (by parent PID, read from /proc)."""
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as fh:
                        parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += [c for c, pp in parent.items() if pp == p]
        return out

    def kill(self, name: str) -> None:
        """SIGKILL one process and its descendants (a supernode and its superexec), by PID."""
        for pid in self.descendants(self.procs[name].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[name].wait(10)

    def down(self) -> list[int]:
        """SIGTERM every process of our sessions by PID, then SIGKILL what is left; returns
        the PIDs still alive afterwards (none expected)."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + grace
            while self.pids() and time.time() < end:
                for p in self.procs.values():
                    p.poll()
                time.sleep(0.2)
        for p in self.procs.values():
            try:
                p.wait(1)
            except subprocess.TimeoutExpired:
                pass
        return self.pids()

    def run(self, app: str, timeout: float) -> subprocess.CompletedProcess:
        p = subprocess.Popen([f"{BIN}/flwr", "run", app, "local-deployment", "--stream"], env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             cwd=self.root)
        self.procs[f"flwr-run-{len(self.procs)}"] = p
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError("flwr run did not finish in time") from None
        return subprocess.CompletedProcess(p.args, p.returncode, out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):  # the apps run one thread each (run config "threads")
        yield


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(str(tmp_path_factory.mktemp("flower")))
    try:
        d.up()
        yield d
    finally:
        left = d.down()
    assert not left, f"processes left running: {left}"


def _flower(d: Deployment, name: str, cfg: dict):
    app, out = os.path.join(d.root, f"app-{name}"), os.path.join(d.root, f"out-{name}")
    write_app(app, {**cfg, "out-dir": out})
    return app, out


def _load(out: str):
    with open(os.path.join(out, "history.json")) as fh:
        hist = json.load(fh)
    final = torch.load(os.path.join(out, "final.pt"), map_location="cpu", weights_only=True)
    return hist, final


def _simulate(cfg: dict, fault_fn=None):
    setup = build(cfg)
    net = setup.net()
    h = simulate(net, setup.train, setup.test, setup.clients, setup.rule(), progress=False, augment=setup.augment,
                 fault_fn=fault_fn, **setup.simulate_kwargs())
    return net, h


def _report(name: str, payload: dict) -> None:
    """Seconds per round and bytes, kept beside the test log (and printed with -s)."""
    print(f"\n[flower vs simulate] {name}: {json.dumps(payload)}")
    path = os.environ.get("SLIMKERN_FLOWER_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"case": name, **payload}) + "\n")


@pytest.mark.parametrize("strategy", ["heterofl", "paradis"])
def test_flwr_run_equals_simulate(deployment, strategy):
    cfg = {**BASE, "strategy": strategy}
    app, out = _flower(deployment, strategy, cfg)
    t0 = time.perf_counter()
    res = deployment.run(app, timeout=600)
    flower_s = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-4000:]
    hist, final = _load(out)
    net, h = _simulate(cfg)
    # the same rounds: clients, acceptances, accuracies per tier
    assert len(hist["rounds"]) == len(h.rounds) == cfg["rounds"]
    for fr, sr in zip(hist["rounds"], h.rounds):
        assert fr["selected"] == sr.selected == [0, 1, 2]
        assert fr["accepted"] == sr.accepted == [0, 1, 2] and fr["rejected"] == [] and fr["dropped"] == []
        assert fr["tier_accuracy"] == sr.tier_accuracy
    # bit-identical final weights (and BN statistics calibrated the same way on the same data)
    sd = net.state_dict()
    assert set(final["model"]) == set(sd)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(final["model"][k], v), k
    # bytes on the wire, measured from the ArrayRecords sent and received, per tier
    for wire, fr, sr in zip(hist["wire"], hist["rounds"], h.rounds):
        assert wire["down"] == fr["bytes_down"] == sr.bytes_down
        assert wire["up"] == fr["bytes_up"] == sr.bytes_up
    # HeteroFL's label split: a client lacking labels sends fewer classifier rows than it gets
    if strategy == "heterofl":
        assert any(sr.bytes_up[t] < sr.bytes_down[t] for sr in h.rounds for t in sr.bytes_up)
    _report(strategy, {"flower_round_s": hist["round_seconds"], "simulate_round_s": [r.wall_time for r in h.rounds],
                       "flwr_run_s": flower_s, "bytes_down": h.rounds[0].bytes_down, "bytes_up": h.rounds[0].bytes_up})


def test_killed_supernode_round_completes_without_it(deployment):
    """Supernode 2 (and its superexec) is killed while it trains: after the round's timeout
    the round completes with clients 0 and 1, client 2 is logged missing, and the result is
    exactly ``simulate`` with client 2's reply dropped."""
    cfg = {**BASE, "strategy": "paradis", "rounds": 1, "timeout": 75.0}
    app, out = _flower(deployment, "kill", cfg)
    log_before = deployment.read("supernode2").count("Start `flwr-clientapp` process")
    p = subprocess.Popen([f"{BIN}/flwr", "run", app, "local-deployment", "--stream"], env=deployment.env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         cwd=deployment.root)
    deployment.procs["flwr-run-kill"] = p
    # the query and then the train message each start a clientapp on supernode 2: kill at the second
    deployment.wait_log("supernode2", lambda t: t.count("Start `flwr-clientapp` process") >= log_before + 2, 300)
    deployment.kill("supernode2")
    t_kill = time.perf_counter()
    stdout, _ = p.communicate(timeout=400)
    assert p.returncode == 0, stdout[-4000:]
    hist, final = _load(out)
    (rec,) = hist["rounds"]
    assert rec["accepted"] == [0, 1] and rec["dropped"] == [2], rec
    ((cid, why),) = rec["dropped_reasons"]
    assert cid == 2 and ("no reply within the timeout" in why or "replied with an error" in why), why
    assert "client 2" in stdout and ("missing" in stdout or "dropped" in stdout), stdout[-4000:]
    assert hist["wire"][0]["up"] == rec["bytes_up"] and "two" not in rec["bytes_up"]
    net, h = _simulate(cfg, fault_fn=lambda r, u: None if u.client == 2 else u)
    assert h.rounds[0].accepted == [0, 1] and h.rounds[0].dropped == [2]
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(final["model"][k], v), k
    _report("kill", {"round_s": hist["round_seconds"], "after_kill_s": time.perf_counter() - t_kill, "reason": why})
