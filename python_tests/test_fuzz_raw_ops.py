"""The C++ ops called directly (``torch.ops.slimkern.*``, what torch.compile and export call),
past the Python wrappers' checks: every bad argument must be a ``TORCH_CHECK`` error that names
it, never a crash, an out-of-bounds read or an error from deep inside ATen/oneDNN.

Each call runs in this process; the arguments were first tried in a subprocess (none crashed).
"""
import pytest
import torch

import slimkern  # noqa: F401  (loads the ops)
from slimkern import _library

pytestmark = pytest.mark.skipif(not _library.has_op("block_conv2d"), reason="the C++ extension is not built")
op = torch.ops.slimkern
ONE = [1, 1]


def conv(blocks=(0, 6, 0, 8), offs=(0,), stride=ONE, padding=ONE, dilation=ONE, depthwise=False, x=None, w=None):
    x = torch.randn(2, 6, 5, 5) if x is None else x
    w = torch.randn(8, 6, 3, 3) if w is None else w
    return op.block_conv2d(x, w, None, list(blocks), list(offs), stride, padding, dilation, depthwise)


def conv_bwd(offs):
    return op.block_conv2d_backward(torch.randn(2, 8, 5, 5), torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3),
                                    [0, 6, 0, 8], offs, ONE, ONE, ONE, False, [True, True, True])


def linear(blocks=(0, 6, 0, 8), offs=(0,)):
    return op.block_linear(torch.randn(2, 6), torch.randn(8, 6), None, list(blocks), list(offs))


def linear_bwd(offs):
    return op.block_linear_backward(torch.randn(2, 8), torch.randn(2, 6), torch.randn(8, 6), [0, 6, 0, 8], offs,
                                    [True, True, True])


def bn(blocks=(0, 8), rows=(0,), training=True, activation="none", x=None):
    x = torch.randn(2, 8) if x is None else x
    return op.switchable_batch_norm(x, None, None, torch.zeros(2, 8), torch.ones(2, 8), list(blocks), list(rows),
                                    training, 1e-5, activation)


CHECKED = [
    ("conv negative in_start", lambda: conv(blocks=(-1, 5, 0, 8)), "block 0"),
    ("conv in_stop 2**31+6", lambda: conv(blocks=(0, 2**31 + 6, 0, 8)), "block 0"),
    ("conv in range 2**32", lambda: conv(blocks=(2**32, 2**32 + 6, 0, 8)), "block 0"),
    ("conv stop < start", lambda: conv(blocks=(4, 2, 0, 8)), "block 0"),
    ("conv out near int64 max", lambda: conv(blocks=(0, 6, 2**63 - 9, 2**63 - 1)), "block 0"),
    ("conv offset -1", lambda: conv(offs=(-1,)), "block 0 reads"),
    ("conv offset 2**32", lambda: conv(offs=(2**32,)), "block 0 reads"),
    ("conv offset int64 min", lambda: conv(offs=(-(2**63),)), "block 0 reads"),
    ("conv table of 3", lambda: conv(blocks=(0, 6, 0)), "4 entries per block"),
    ("conv empty table", lambda: conv(blocks=(), offs=()), "empty"),
    ("conv empty block", lambda: conv(blocks=(0, 0, 0, 8)), "empty"),
    ("conv 2 offsets 1 block", lambda: conv(offs=(0, 0)), "x_offsets"),
    ("conv stride 0", lambda: conv(stride=[0, 1]), "stride"),
    ("conv padding -3", lambda: conv(padding=[-3, -3]), "padding"),
    ("conv dilation 0", lambda: conv(dilation=[0, 0]), "dilation"),
    ("conv stride of 3", lambda: conv(stride=[1, 1, 1]), "stride"),
    ("conv kernel too big", lambda: conv(padding=[0, 0], dilation=[3, 3]), "smaller than the dilated kernel"),
    ("conv depthwise 2-d weight", lambda: conv(depthwise=True), "depthwise"),
    ("conv int tensors", lambda: conv(x=torch.zeros(2, 6, 5, 5, dtype=torch.long),
                                      w=torch.zeros(8, 6, 3, 3, dtype=torch.long)), "floating"),
    ("conv mixed dtypes", lambda: conv(w=torch.randn(8, 6, 3, 3, dtype=torch.float64)), "dtype"),
    ("conv backward bad grad", lambda: op.block_conv2d_backward(
        torch.randn(2, 3, 5, 5), torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3), [0, 6, 0, 8], [0], ONE, ONE, ONE,
        False, [True, True, True]), "grad_out"),
    ("linear negative out", lambda: linear(blocks=(0, 6, -1, 8)), "block 0"),
    ("linear offset 2**62", lambda: linear(offs=(2**62,)), "block 0 reads"),
    ("linear 3-d x", lambda: op.block_linear(torch.randn(2, 6, 1), torch.randn(8, 6), None, [0, 6, 0, 8], [0]),
     "rank"),
    ("bn row 5 of 2", lambda: bn(rows=(5,)), "stat_rows"),
    ("bn row near int64 max", lambda: bn(rows=(2**63 - 1,)), "stat_rows"),
    ("bn negative block", lambda: bn(blocks=(-4, 4)), "block 0"),
    ("bn block near int64 max", lambda: bn(blocks=(2**63 - 2, 2**63 - 1)), "block 0"),
    ("bn block int64 min", lambda: bn(blocks=(-(2**63), 8)), "block 0"),
    ("bn 2 rows 1 block", lambda: bn(rows=(0, 0)), "stat_rows"),
    ("bn activation", lambda: bn(activation="gelu"), "activation"),
    ("bn one value per channel", lambda: bn(x=torch.randn(1, 8)), "more than 1 value"),
    ("bn update count 1", lambda: op.switchable_batch_norm_update_stats_(
        torch.zeros(2, 8), torch.ones(2, 8), None, torch.zeros(8), torch.ones(8), [0, 8], [0], 1, 0.1), "count"),
    ("bn update row 7", lambda: op.switchable_batch_norm_update_stats_(
        torch.zeros(2, 8), torch.ones(2, 8), None, torch.zeros(8), torch.ones(8), [0, 8], [7], 18, 0.1), "stat_rows"),
    ("bn update short save", lambda: op.switchable_batch_norm_update_stats_(
        torch.zeros(2, 8), torch.ones(2, 8), None, torch.zeros(2), torch.ones(2), [0, 8], [0], 18, 0.1), "save_mean"),
    ("bn backward short save", lambda: op.switchable_batch_norm_backward(
        torch.randn(2, 8), torch.randn(2, 8), None, None, torch.zeros(2), torch.ones(2), [0, 8], 8, True, 1e-5,
        "none"), "save_mean"),
    ("viterbi pairwise shape", lambda: op.viterbi(torch.randn(1, 3, 4), torch.randn(1, 1, 4, 4)), "pairwise"),
    ("viterbi 2-d unary", lambda: op.viterbi(torch.randn(3, 4), torch.randn(2, 4, 4)), "unary"),
    ("marginals temperature 0", lambda: op.viterbi_marginals(torch.randn(1, 3, 4), torch.randn(1, 2, 4, 4), 0.0),
     "temperature"),
    ("marginals temperature nan", lambda: op.viterbi_marginals(torch.randn(1, 3, 4), torch.randn(1, 2, 4, 4),
                                                               float("nan")), "temperature"),
    ("sinkhorn reg 0", lambda: op.sinkhorn(torch.full((1, 3), 1 / 3), torch.full((1, 4), 0.25), torch.rand(1, 3, 4),
                                           0.0, "log", 10, 1e-9, 1, None, None), "reg"),
    ("sinkhorn method", lambda: op.sinkhorn(torch.full((1, 3), 1 / 3), torch.full((1, 4), 0.25),
                                            torch.rand(1, 3, 4), 0.1, "bogus", 10, 1e-9, 1, None, None), "method"),
    ("sinkhorn check_every 0", lambda: op.sinkhorn(torch.full((1, 3), 1 / 3), torch.full((1, 4), 0.25),
                                                   torch.rand(1, 3, 4), 0.1, "log", 10, 1e-9, 0, None, None),
     "check_every"),
    ("sinkhorn warm start shape", lambda: op.sinkhorn(torch.full((1, 3), 1 / 3), torch.full((1, 4), 0.25),
                                                      torch.rand(1, 3, 4), 0.1, "log", 10, 1e-9, 1, torch.zeros(1, 2),
                                                      torch.zeros(1, 4)), "warm"),
    ("sinkhorn nan a", lambda: op.sinkhorn(torch.tensor([[float("nan"), 1.0, 0.0]]), torch.full((1, 4), 0.25),
                                           torch.rand(1, 3, 4), 0.1, "log", 10, 1e-9, 1, None, None), "a contains"),
    ("sinkhorn zero mass", lambda: op.sinkhorn(torch.zeros(1, 3), torch.zeros(1, 4), torch.rand(1, 3, 4), 0.1,
                                               "standard", 10, 1e-9, 1, None, None), "zero total mass"),
]


@pytest.mark.parametrize("name, call, match", CHECKED, ids=[c[0] for c in CHECKED])
def test_bad_arguments_are_checked_errors(name, call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


OVERFLOWING = [
    ("conv offset int64 max", lambda: conv(offs=(2**63 - 1,)), "block 0 reads"),
    ("conv offset int64 max - 3", lambda: conv(offs=(2**63 - 3,)), "block 0 reads"),
    ("conv backward offset int64 max - 3", lambda: conv_bwd([2**63 - 3]), "block 0 reads"),
    ("linear offset int64 max", lambda: linear(offs=(2**63 - 1,)), "block 0 reads"),
    ("linear backward offset int64 max - 3", lambda: linear_bwd([2**63 - 3]), "block 0 reads"),
]


@pytest.mark.parametrize("name, call, match", OVERFLOWING, ids=[c[0] for c in OVERFLOWING])
def test_offsets_whose_window_end_overflows_int64_are_checked(name, call, match):
    """``offset + in_size`` would overflow int64 (undefined behaviour in C++): the range check
    must not compute it (it once passed and ``narrow`` raised an IndexError from inside ATen)."""
    with pytest.raises(RuntimeError, match=match):
        call()


HUGE_GEOMETRY = [
    ("padding 2**62", lambda: conv(padding=[2**62, 2**62]), "padding"),
    ("padding 2**31", lambda: conv(padding=[2**31, 2**31]), "padding"),
    ("dilation 2**62", lambda: conv(dilation=[2**62, 2**62]), "dilation"),
    ("stride 2**62", lambda: conv(stride=[2**62, 2**62]), "stride"),
]


@pytest.mark.parametrize("name, call, match", HUGE_GEOMETRY, ids=[c[0] for c in HUGE_GEOMETRY])
def test_huge_geometry_is_named(name, call, match):
    """``H + 2 * padding`` and ``dilation * (k - 1)`` overflowed int64 (padding 2**62: "smaller than
    the dilated kernel"), and padding 2**31 reached oneDNN ("could not construct a memory
    descriptor"); the op names the argument and its bound, as the Python wrapper does."""
    with pytest.raises(RuntimeError, match=rf"{match} (must be at most|is too large|overflows)"):
        call()
