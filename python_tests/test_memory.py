"""slimkern.train.keep_freed_memory: freed buffers come back without page faults (glibc)."""
import platform
import subprocess
import sys

import pytest

from slimkern.train import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Runs in a fresh interpreter: the setting is process-wide and must not leak into other tests.
_CHILD = """
import resource, torch
from slimkern.train import keep_freed_memory

def faults(n):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest dynamic mmap threshold
        a.fill_(1.0)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

before = faults(3)
ok = keep_freed_memory()
faults(1)  # the heap grows once
after = faults(6)
print(ok, before, after)
"""


@glibc_only
def test_freed_buffers_are_recycled_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, before, after = out.stdout.split()
    pages = 64 * 2**20 // 4096  # per buffer
    assert ok == "True"
    assert int(before) > 0.9 * 3 * pages  # default glibc: every fresh 64 MiB buffer faults in again
    # recycled heap pages: at most one of the six buffers faults in (heap layout varies by run)
    assert int(after) <= 1.05 * pages


@pytest.mark.parametrize("arg,exc,match", [
    (0, ValueError, r"\[1, 2047\]"), (4096, ValueError, r"\[1, 2047\]"),
    (1.5, TypeError, "must be an int"), (True, TypeError, "must be an int"),
])
def test_bad_arguments(arg, exc, match):
    with pytest.raises(exc, match=match):
        keep_freed_memory(arg)
