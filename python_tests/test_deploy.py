"""slimkern.deploy: worker processes per branch, fused in the coordinator, vs in-process runs."""
import os
import signal

import pytest
import torch

import slimkern
from slimkern.deploy import ParallelDeployment, deploy
from slimkern.deploy import wire
from small_slim_nets import TinyResNet, train_stats

SW = slimkern.Switch([0.5, 0.25, 0.25])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = TinyResNet(c=16, max_width=1.2)
    return train_stats(n, [SW, slimkern.Switch([1.0])])


@pytest.mark.slow
def test_outputs_equal_export_and_forward_switches_and_workers_stop(net):
    x1, x5 = torch.randn(1, 3, 8, 8), torch.randn(5, 3, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same kernels, the same bits
    try:
        dep = slimkern.export(net, SW)
        with deploy(net, SW, timeout=300) as d:
            pids = d.pids
            assert d.num_workers == 3 and len(set(pids)) == 3 and os.getpid() not in pids
            for x in (x1, x5, x1):
                y = d(x)
                assert torch.equal(y, dep(x))  # bitwise: same branches, same fusion order
                ref = slimkern.forward_switches(net, x, [SW])[0]
                torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
            for p, b in zip(d.partials(x5), dep.branches):
                assert torch.equal(p, b(x5))
            # a bad input is reported with the worker's traceback; the workers keep serving
            with pytest.raises(RuntimeError, match="failed"):
                d(torch.randn(2, 5, 8, 8))
            assert torch.equal(d(x1), dep(x1))
    finally:
        torch.set_num_threads(threads)
    assert all(_gone(p) for p in pids), "a worker outlived close()"
    with pytest.raises(RuntimeError, match="closed"):
        d(x1)


@pytest.mark.slow
def test_a_dead_worker_is_reported_and_the_rest_stopped(net):
    d = ParallelDeployment(slimkern.export(net, "[1.0]x"), timeout=300)
    try:
        pid = d.pids[0]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="died"):
            d(torch.randn(1, 3, 8, 8))
    finally:
        d.close()
    assert _gone(pid)


def test_arguments_are_validated():
    with pytest.raises(TypeError, match="Deployable"):
        ParallelDeployment([])
    with pytest.raises(TypeError, match="Deployable"):
        ParallelDeployment([object()])
    with pytest.raises(ValueError, match="threads"):
        ParallelDeployment([torch.nn.Identity()], threads=0)
    with pytest.raises(ValueError, match="timeout"):
        ParallelDeployment([torch.nn.Identity()], timeout=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_wire_round_trip(dtype):
    t = (torch.randn(3, 4, 2) * 10).to(dtype)
    kind, u = wire.decode(wire.encode(t))
    assert kind == wire.KIND_TENSOR and u.dtype == dtype and torch.equal(u, t)
    assert wire.decode(wire.stop_message()) == (wire.KIND_STOP, None)
    assert wire.decode(wire.error_message("boom")) == (wire.KIND_ERROR, "boom")
    with pytest.raises(ValueError, match="dtype"):
        wire.encode(torch.zeros(2, dtype=torch.complex64))
