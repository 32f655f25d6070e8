"""Triton switchable batch norm under TRITON_INTERPRET=1 (CPU, fp32) vs the per-block reference.

Run: TRITON_INTERPRET=1 python -m pytest python_tests -m triton
"""
import os

import pytest
import torch

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels run on CPU only with TRITON_INTERPRET=1 set before import", allow_module_level=True)
pytest.importorskip("triton")

from reference import ref_switchable_batch_norm  # noqa: E402
from test_switchable_bn import CASES, assert_same, make, run_both  # noqa: E402

from slimkern.ops.switchable_batch_norm import switchable_batch_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", ["paradis", "sandwich", "window"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_triton_matches_reference(case, training, activation):
    blocks, rows = CASES[case]
    x, w, b, rm, rv = make(blocks, device=DEVICE)
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, training, 0.1, activation, "triton")
    assert_same(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spatial", [(), (7,)])
def test_triton_2d_3d_cumulative(spatial):
    blocks, rows = CASES["full+paradis"]
    x, w, b, rm, rv = make(blocks, spatial=spatial, n=9, seed=2, device=DEVICE)
    nbt = torch.tensor([0, 3, 1], device=DEVICE)
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, True, None, "relu6", "triton", nbt=nbt)
    assert_same(ours, ref, atol=2e-5, rtol=1e-4)


def test_triton_no_affine_and_reduction_spanning_blocks():
    # N * HW > the kernel's reduction block, so the channel loop runs several iterations.
    blocks, rows = CASES["sandwich"]
    x, w, b, rm, rv = make(blocks, spatial=(16, 20), n=5, affine=False, seed=3, device=DEVICE)
    x = x + 50.0
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, True, 0.1, "relu", "triton")
    assert_same(ours, ref, atol=1e-4, rtol=1e-3)


def test_triton_fp16_forward():
    blocks, rows = CASES["paradis"]
    x, w, b, rm, rv = make(blocks, device=DEVICE)
    y = switchable_batch_norm(x.half(), w.half(), b.half(), rm.half(), rv.half(), blocks, rows, True, 0.1, 1e-5,
                              "relu", backend="triton")
    ref = ref_switchable_batch_norm(x, w, b, rm.clone(), rv.clone(), blocks, rows, True, 0.1, 1e-5, "relu")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, atol=5e-3, rtol=5e-3)


def test_triton_bad_input_writes_nothing():
    blocks, rows = CASES["paradis"]
    x, w, b, rm, rv = make(blocks, device=DEVICE)
    before = rm.clone()
    with pytest.raises(ValueError, match=r"stat_rows\[1\] = 5 is out of range"):
        switchable_batch_norm(x, w, b, rm, rv, blocks, [1, 5], True, 0.1, 1e-5, "relu", backend="triton")
    assert torch.equal(rm, before)
