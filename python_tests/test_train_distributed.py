"""Data-parallel training (issue 14, part 2): slimkern.train.distributed on 127.0.0.1 with gloo.

The claim under test: W ranks with rank batch b train exactly like one process with batch W*b.
That holds only because BN uses the *global* batch's statistics (synchronised BN, the default):
a BN layer in training mode normalises with its batch's mean and variance, so with per-rank
statistics each rank of batch 32 computes a different function than one batch of 64 and the
gradients differ (measured here: ~1e-2, against the 1e-5 tolerance). The tests state both
sides: with sync_bn the 2-rank run equals the batch-64 process to 1e-5 (gradients after one
step, weights and BN rows after three); with sync_bn off it does *not* (the negative control,
proving the comparison can fail) and instead equals a one-process "ghost batch" reference that
runs the two rank halves of every batch separately and averages their gradients.

Every job is time-bounded (``launch(timeout_s=...)``) and everything started is stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker as W  # noqa: E402

from slimkern.train import distributed as D  # noqa: E402
from slimkern.train.shard_sampler import RankShardSampler  # noqa: E402

WORKER = os.path.join(HERE, "dist_worker.py")
JOB_TIMEOUT = 240.0
TOL = dict(atol=1e-5, rtol=1e-5)


def _launch(*args, nproc=2) -> None:
    rc = D.launch([sys.executable, WORKER, *map(str, args)], nproc, timeout_s=JOB_TIMEOUT,
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rc == 0, f"job {args} exited with {rc}"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------ sharding (no processes)

@pytest.mark.parametrize("n,world,batch", [(200, 2, 32), (64, 2, 32), (37, 2, 32), (200, 3, 16), (10, 3, 4)])
def test_rank_batches_tile_the_single_process_batches(n, world, batch):
    """Union over ranks of every rank's k-th batch == the one-process k-th batch of world*batch
    (DataLoader(shuffle=True, generator) of the same seed); rank batches have equal sizes."""
    data = TensorDataset(torch.arange(n))
    single = [b[0].tolist() for b in DataLoader(data, batch_size=world * batch, shuffle=True,
                                                drop_last=n > world * batch,
                                                generator=torch.Generator().manual_seed(5))]
    ranks = []
    for r in range(world):
        g = torch.Generator().manual_seed(5)
        ranks.append([b[0].tolist() for b in DataLoader(data, batch_size=batch, generator=g,
                                                        sampler=RankShardSampler(n, r, world, batch, g))])
    assert len({len(rb) for rb in ranks}) == 1
    for k, rank_batches in enumerate(zip(*ranks)):
        assert len({len(b) for b in rank_batches}) == 1
        got = sorted(i for b in rank_batches for i in b)
        if n > world * batch or n % world == 0:
            assert got == sorted(single[k])
        else:  # n <= world*batch and not divisible: the n % world leftover samples are dropped
            assert len(got) == n - n % world and set(got) <= set(single[k])
    if n > world * batch:
        assert len(ranks[0]) == len(single) == n // (world * batch)


def test_one_rank_replays_the_single_process_order_exactly():
    data = TensorDataset(torch.arange(100))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # two epochs: the generator advances the same way
        ref = [b[0].tolist() for b in DataLoader(data, batch_size=16, shuffle=True, drop_last=True, generator=g1)]
        got = [b[0].tolist() for b in DataLoader(data, batch_size=16, generator=g2,
                                                 sampler=RankShardSampler(100, 0, 1, 16, g2))]
        assert got == ref


def test_sampler_validates():
    g = torch.Generator()
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        RankShardSampler(10, 2, 2, 4, g)
    with pytest.raises(ValueError, match="needs the generator"):
        RankShardSampler(10, 0, 2, 4, None)
    with pytest.raises(ValueError, match="cannot give each"):
        RankShardSampler(1, 0, 2, 4, g)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        RankShardSampler(10, 0, 2, 0, g)


# ------------------------------------------------------------------------------ sync BN, one rank in-process

@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_sync_bn_on_one_rank_equals_the_op(one_rank_group, activation):
    """ParaDiS blocks ([1.0] row 0; [0.5,0.5] row 1): output, input/affine gradients and running
    rows equal slimkern.ops.switchable_batch_norm's (the fused C++ kernel)."""
    from slimkern.ops import switchable_batch_norm
    from slimkern.train.sync_batch_norm import sync_switchable_batch_norm

    g = torch.Generator().manual_seed(0)
    blocks, rows = [(0, 8), (0, 4), (4, 8)], [0, 1, 1]
    x = torch.randn(6, 16, 5, 5, generator=g) * 3 + 1
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    dy = torch.randn(6, 16, 5, 5, generator=g)
    outs = []
    for fn in (switchable_batch_norm, sync_switchable_batch_norm):
        xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), torch.ones(2, 8) * 2
        y = fn(xi, wi, bi, rm, rv, blocks, rows, True, 0.1, 1e-5, activation)
        (y * dy).sum().backward()
        outs.append((y.detach(), xi.grad, wi.grad, bi.grad, rm, rv))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_synchronised_batch_norm_is_scoped(one_rank_group):
    from slimkern.train.sync_batch_norm import synchronised_batch_norm
    from small_slim_nets import TinyResNet

    net = TinyResNet()
    with synchronised_batch_norm(net):
        assert net.bn0.process_group is not None
    assert all(getattr(m, "process_group", 1) is None for m in (net.bn0, net.bn1, net.bn2))


# ------------------------------------------------------------------------------ launcher

def test_launch_stops_every_rank_when_one_fails(tmp_path):
    """Rank 1 fails at once; rank 0 (which would sleep a minute) is stopped, its pid gone."""
    code = ("import os, sys, time\nr = int(os.environ['RANK'])\n"
            f"open(os.path.join({str(tmp_path)!r}, f'pid{{r}}'), 'w').write(str(os.getpid()))\n"
            "time.sleep(0.5)\nsys.exit(3) if r == 1 else time.sleep(60)\n")
    t0 = time.monotonic()
    rc = D.launch([sys.executable, "-c", code], 2, timeout_s=30, grace_s=2)
    assert rc == 3 and time.monotonic() - t0 < 20
    _assert_gone(int((tmp_path / "pid0").read_text()))


def test_launch_timeout_and_validation():
    assert D.launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout_s=1, grace_s=1) == 124
    with pytest.raises(ValueError, match="nproc must be a positive int"):
        D.launch([sys.executable], 0)
    with pytest.raises(ValueError, match="unknown distributed backend"):
        D.init_from_env("mpi")


# ------------------------------------------------------------------------------ 2 ranks vs 1 process

def _assert_gone(pid: int, wait_s: float = 10.0) -> None:
    """``pid`` has exited (absent, or a zombie its new parent has not reaped yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"process {pid} is still running (state {state})"
        time.sleep(0.1)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def ghost_batch_reference(recipe: str):
    """One process, batch 64, but BN statistics per rank half (rank r's samples are positions
    r::2 of each batch, RankShardSampler's layout): the two halves run separately and the
    gradient is their average -- what 2 ranks compute with per-rank statistics."""
    from slimkern.train.optim import make_scheduler

    t = W.trainer(recipe=recipe)
    loader = t.make_loader(W.dataset(), 2 * W.RANK_BATCH)
    t.scheduler = make_scheduler(t.optimizer, t.schedule, 2 * len(loader), len(loader))
    out = {}
    for i, (x, y) in enumerate(loader):
        if i == 3:
            break
        t.net.train()
        t.optimizer.zero_grad(set_to_none=True)
        for r in range(2):
            total, _ = t.loss(x[r::2], y[r::2])
            (total / 2).backward()
        if i == 0:
            out["grads"] = {n: p.grad.clone() for n, p in t.net.named_parameters() if p.grad is not None}
        t.optimizer.step()
        t.scheduler.step()
    out["params"] = {n: p.detach().clone() for n, p in t.net.named_parameters()}
    return out


@pytest.fixture(scope="module")
def single_process_batch_64():
    torch.set_num_threads(1)
    return {recipe: W.run_steps(W.trainer(recipe=recipe), 2 * W.RANK_BATCH) for recipe in W.RECIPES}


@pytest.mark.slow
def test_two_ranks_with_sync_bn_equal_one_process_with_batch_64(tmp_path, single_process_batch_64):
    """ParaDiS (fixed switches) and sandwich (random widths, BN rows registered on the way)."""
    _launch("steps", tmp_path)
    rank0, rank1 = _load(tmp_path / "rank0.pt"), _load(tmp_path / "rank1.pt")
    assert rank0["world_size"] == 2
    for recipe in W.RECIPES:
        r0, r1, ref = rank0[recipe], rank1[recipe], single_process_batch_64[recipe]
        assert r0["steps_per_epoch"] == ref["steps_per_epoch"] == 3
        assert set(r0["grads"]) == set(ref["grads"])
        for k in ref["grads"]:  # after one step
            torch.testing.assert_close(r0["grads"][k], ref["grads"][k], **TOL, msg=f"{recipe} {k}")
        assert set(r0["state"]) == set(ref["state"])
        for k in ref["state"]:  # weights and BN rows after three steps
            torch.testing.assert_close(r0["state"][k], ref["state"][k], **TOL, msg=f"{recipe} {k}")
        torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(ref["losses"]), **TOL)
        for k in r0["state"]:  # the ranks hold bit-identical weights and statistics
            assert torch.equal(r0["state"][k], r1["state"][k]), f"{recipe} {k}"


@pytest.mark.slow
def test_two_ranks_with_per_rank_bn_are_ghost_batches_not_batch_64(tmp_path, single_process_batch_64):
    _launch("steps", tmp_path, "--no-sync-bn")
    r0, r1 = _load(tmp_path / "rank0.pt")["paradis"], _load(tmp_path / "rank1.pt")["paradis"]
    # the negative control: per-rank batch statistics are not batch 64's
    assert _max_diff(r0["grads"], single_process_batch_64["paradis"]["grads"]) > 1e-3
    ghost = ghost_batch_reference("paradis")
    for k in ghost["grads"]:
        torch.testing.assert_close(r0["grads"][k], ghost["grads"][k], **TOL, msg=k)
    params = {k: r0["state"][k] for k in ghost["params"]}
    for k in ghost["params"]:
        torch.testing.assert_close(params[k], ghost["params"][k], **TOL, msg=k)
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # averaged gradients: same weights


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    _launch("fit", full, full / "ckpt.pt", 3)

    # the same job, killed (SIGKILL to the launcher and both ranks) once epoch 1's checkpoint is on disk
    code = (f"import sys; sys.path.insert(0, {HERE!r}); from slimkern.train.distributed import launch; "
            f"sys.exit(launch([sys.executable, {WORKER!r}, 'fit', {str(killed)!r}, {str(killed / 'ckpt.pt')!r}, "
            "'3', '--stall-after', '1'], 2))")
    job = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (killed / "stalled").exists():
            assert job.poll() is None, f"job ended early with {job.returncode}"
            assert time.monotonic() < deadline, "the job never reached its first checkpoint"
            time.sleep(0.1)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    for pid in [int((killed / f"pid{r}").read_text()) for r in range(2)]:
        _assert_gone(pid)  # nothing of that job is left
    assert _load(killed / "ckpt.pt")["epoch"] == 1
    assert not (killed / "final.pt").exists()

    _launch("fit", killed, killed / "ckpt.pt", 3)  # resume=True in the worker
    a, b = _load(full / "final.pt"), _load(killed / "final.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["state"]:  # bit-identical: same machine, same ranks, deterministic kernels
        if isinstance(a["state"][k], torch.Tensor):
            assert torch.equal(a["state"][k], b["state"][k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


@pytest.mark.slow
def test_torchrun_runs_the_same_job(tmp_path, single_process_batch_64):
    """Under torchrun (static rendezvous on 127.0.0.1) the worker joins the same way."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    proc = subprocess.run(torchrun + [WORKER, "steps", str(tmp_path)], timeout=JOB_TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = _load(tmp_path / "rank0.pt")
    for recipe in W.RECIPES:
        assert _max_diff(r0[recipe]["grads"], single_process_batch_64[recipe]["grads"]) < 1e-5


@pytest.mark.slow
def test_cli_nproc_2_writes_one_run_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slimkern", "train", "--nproc", "2", "--dataset", "digits", "--image-size", "8",
           "--model", "resnet20", "--width-mult", "0.25", "--recipe", "paradis", "--kd", "full",
           "--switches", "[1.0]x", "[0.5, 0.5]x", "--epochs", "1", "--batch-size", "32",
           "--calibrate-batches", "1", "--no-progress", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, timeout=JOB_TIMEOUT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = _load(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and (out / "report.json").exists()
    # 1,347 training digits, global batch 64: 21 steps (one process with batch 64 takes as many)
    assert ck["global_step"] == 1347 // 64
    log = (out / "train.log").read_text()
    assert log.count("epoch 1/1") == 1  # rank 0 alone logs and writes
