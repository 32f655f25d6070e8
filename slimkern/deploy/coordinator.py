"""``ParallelDeployment``: a ParaDiS switch served by one worker process per branch (Figure 1 D
of Ozerov et al.).

``slimkern.export(net, sw)`` gives one plain model per branch: branch ``i`` computes the
partial output ``W[:, b_i] f_i(x)`` of the fused classifier. The coordinator sends the input
to every worker at once (each runs its branch on its own CPU thread, in its own process),
then sums the partial outputs in branch order and adds the classifier bias once:

.. math:: y = \\Big(\\sum_{i=0}^{B-1} W[:, b_i]\\, f_i(x)\\Big) + b

then, when the net has an epilogue after its fused layer (WDSR: image skip conv, pixel
shuffle), runs ``Deployable.fusion(x, y)`` once. This is ``Deployable.forward`` term for term,
so the result is bitwise the in-process deployable's (and equals the packed ``slimkern.forward_switches`` to float rounding). Only
the input and the ``[N, classes]`` partial outputs travel, over local socket pairs
(``multiprocessing.Pipe``).

Workers are fresh interpreters (``python -m slimkern.deploy.worker``, no fork of a threaded
parent, no re-import of the caller's main script), each holding one end of a socket pair; the
branch travels over it once at start. ``close()`` (also on ``with`` exit and on garbage
collection) stops them: a stop message, a bounded wait, then SIGTERM / SIGKILL to the
worker's PID if it is still alive.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
import torch
from torch import nn

from slimkern.deploy import wire

__all__ = ["ParallelDeployment", "deploy"]


class ParallelDeployment:
    """Runs ``branches`` in worker processes and fuses their outputs.

    Args:
        branches: plain modules, one per worker (``slimkern.export(net, sw).branches``), or a
            ``Deployable`` (its branches and bias are taken).
        bias: added once to the sum (the fused classifier's bias); taken from a Deployable.
        fusion: the epilogue ``fusion(x, sum)`` run in the coordinator after the bias; taken
            from a Deployable (``Deployable.fusion``), None for a classifier.
        threads: CPU threads per worker (1: one core per branch, the paper's devices).
        timeout: seconds to wait for a worker's start or reply before raising.

    ``dep(x)`` returns the fused output; ``dep.pids`` the workers' process ids.
    """

    def __init__(self, branches, bias: torch.Tensor | None = None, threads: int = 1, timeout: float = 120.0,
                 fusion: nn.Module | None = None):
        from slimkern.export import Deployable

        if isinstance(branches, Deployable):
            if bias is not None or fusion is not None:
                raise ValueError("ParallelDeployment: a Deployable carries its own bias and fusion; do not pass them")
            bias = branches.bias.detach().clone() if branches.bias is not None else None
            fusion = branches.fusion
            branches = list(branches.branches)
        if fusion is not None and not isinstance(fusion, nn.Module):
            raise TypeError(f"ParallelDeployment: fusion must be an nn.Module or None, got {type(fusion).__name__}")
        branches = list(branches) if isinstance(branches, (list, tuple, nn.ModuleList)) else None
        if not branches or not all(isinstance(b, nn.Module) for b in branches):
            raise TypeError("ParallelDeployment: give a Deployable or a non-empty list of nn.Modules")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"ParallelDeployment: threads must be a positive int, got {threads!r}")
        if not timeout > 0:
            raise ValueError(f"ParallelDeployment: timeout must be > 0, got {timeout!r}")
        self.bias = bias
        self.fusion = fusion.eval() if fusion is not None else None
        self.timeout = float(timeout)
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        try:
            for _ in branches:  # start all first: their interpreters boot in parallel
                ours, theirs = socket.socketpair()
                try:
                    p = subprocess.Popen([sys.executable, "-m", "slimkern.deploy.worker", str(theirs.fileno()),
                                          str(threads)], pass_fds=(theirs.fileno(),), env=env)
                finally:
                    theirs.close()
                self._procs.append(p)
                self._conns.append(Connection(ours.detach()))
            for b, c in zip(branches, self._conns):
                blob = io.BytesIO()
                torch.save(b.eval(), blob)
                c.send_bytes(blob.getvalue())
            for i in range(len(self._conns)):
                ready = self._recv(i)
                if isinstance(ready, Exception):
                    raise ready
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def num_workers(self) -> int:
        return len(self._procs)

    def _died(self, i: int) -> RuntimeError:
        p = self._procs[i]
        try:
            p.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        return RuntimeError(f"deploy: worker {i} (pid {p.pid}) died (exit code {p.returncode}); close() the "
                            "deployment and start a new one")

    def _recv(self, i: int) -> torch.Tensor | RuntimeError:
        conn, p = self._conns[i], self._procs[i]
        deadline = time.monotonic() + self.timeout
        while not conn.poll(0.05):
            if p.poll() is not None:
                raise self._died(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"deploy: worker {i} (pid {p.pid}) did not answer within {self.timeout} s")
        try:
            kind, y = wire.decode(conn.recv_bytes())
        except (EOFError, OSError):
            raise self._died(i) from None
        if kind == wire.KIND_ERROR:
            return RuntimeError(f"deploy: worker {i} (pid {p.pid}) failed:\n{y}")
        return y

    def partials(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's partial output for ``x`` (sent to all first, so they run in parallel)."""
        if not self._procs:
            raise RuntimeError("deploy: the deployment is closed")
        msg = wire.encode(x)
        for i, c in enumerate(self._conns):
            try:
                c.send_bytes(msg)
            except OSError:
                raise self._died(i) from None
        # every reply is read before an error is raised, so none is left for the next call
        out = [self._recv(i) for i in range(len(self._conns))]
        for y in out:
            if isinstance(y, Exception):
                raise y
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"deploy: x must be a tensor, got {type(x).__name__}")
        parts = self.partials(x)
        y = parts[0]
        for p in parts[1:]:  # the order of Deployable.forward: bitwise the same sum
            y = y + p
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * (y.dim() - 2)))
        if self.fusion is not None:
            with torch.no_grad():
                y = self.fusion(x, y)
        return y

    def close(self, timeout: float = 10.0) -> None:
        """Stops every worker: stop message, join, then SIGTERM and SIGKILL by PID."""
        for c in self._conns:
            try:
                c.send_bytes(wire.stop_message())
            except (OSError, ValueError):
                pass  # the worker is gone already
        deadline = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self._procs:
                if p.poll() is None:
                    try:
                        os.kill(p.pid, sig)
                    except ProcessLookupError:
                        pass
                    try:
                        p.wait(2.0)
                    except subprocess.TimeoutExpired:
                        pass
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> "ParallelDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close(timeout=1.0)


def deploy(net: nn.Module, sw, threads: int = 1, timeout: float = 120.0) -> ParallelDeployment:
    """``slimkern.export(net, sw)`` served by ``sw.num_branches`` worker processes."""
    import slimkern

    return ParallelDeployment(slimkern.export(net, sw), threads=threads, timeout=timeout)
