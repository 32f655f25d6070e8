"""The worker process of a ParaDiS deployment: one exported branch, one CPU thread.

Started by the coordinator as ``python -m slimkern.deploy.worker <fd> <threads>`` with one end
of a local socket pair inherited as ``fd``. It receives its branch (a plain ``torch.fx``
module of standard layers from ``slimkern.export``, serialised by the coordinator), then input
tensors; it runs the branch and sends back the partial output. It stops on a stop message or
when the coordinator's end of the socket closes.
"""
from __future__ import annotations

import io
import sys
import traceback


def serve(conn, threads: int = 1) -> None:
    """Receive the branch, then answer every input with the branch's output until told to stop."""
    import torch

    from slimkern.deploy import wire

    torch.set_num_threads(threads)
    # The branch comes from our own coordinator over a private socket pair, not from a file:
    # a GraphModule's code must be unpickled (weights_only cannot hold code).
    branch = torch.load(io.BytesIO(conn.recv_bytes()), weights_only=False).eval()
    conn.send_bytes(wire.encode(torch.tensor([threads], dtype=torch.int64)))  # ready
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the coordinator is gone
        kind, x = wire.decode(msg)
        if kind == wire.KIND_STOP:
            return
        try:
            with torch.no_grad():
                y = branch(x)
            conn.send_bytes(wire.encode(y))
        except Exception:  # report and keep serving: the coordinator decides
            conn.send_bytes(wire.error_message(traceback.format_exc()))


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    if len(argv) != 2:
        print("usage: python -m slimkern.deploy.worker <socket fd> <threads>", file=sys.stderr)
        return 2
    conn = Connection(int(argv[0]))
    try:
        serve(conn, int(argv[1]))
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
