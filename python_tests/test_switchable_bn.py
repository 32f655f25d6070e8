"""slimkern.ops.switchable_batch_norm vs per-block F.batch_norm + activation + cat."""
import pytest
import torch

import slimkern
from slimkern import _library
from slimkern.ops.switchable_batch_norm import switchable_batch_norm
from reference import ref_switchable_batch_norm

C = 8
# (blocks, stat_rows): one prefix slice, ParaDiS [0.5, 0.5], sandwich [1.0],[0.5],[0.25] packed,
# a full switch and a ParaDiS switch sharing no row, a non-prefix (rolling) window.
CASES = {
    "prefix": ([(0, 6)], [0]),
    "paradis": ([(0, 4), (4, 8)], [1, 1]),
    "sandwich": ([(0, 8), (0, 4), (0, 2)], [0, 1, 2]),
    "full+paradis": ([(0, 8), (0, 4), (4, 8)], [0, 1, 1]),
    "window": ([(2, 7)], [2]),
}
needs_cpp = pytest.mark.skipif(not _library.has_op("switchable_batch_norm"),
                               reason=f"C++ extension not built: {_library.LOAD_ERROR}")


def make(blocks, spatial=(3, 5), n=4, dtype=torch.float32, seed=0, S=3, affine=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cp = sum(b - a for a, b in blocks)
    x = (torch.randn(n, cp, *spatial, generator=g, dtype=dtype) * 2 + 0.5).to(device)
    w = (torch.rand(C, generator=g, dtype=dtype) + 0.5).to(device) if affine else None
    b = (torch.randn(C, generator=g, dtype=dtype) * 0.3).to(device) if affine else None
    rm = (torch.randn(S, C, generator=g, dtype=dtype) * 0.1).to(device)
    rv = (torch.rand(S, C, generator=g, dtype=dtype) + 0.5).to(device)
    return x, w, b, rm, rv


def run_both(x, w, b, rm, rv, blocks, rows, training, momentum, activation, backend, nbt=None, eps=1e-5):
    """Runs slimkern and the reference on separate copies; returns (ours, ref) tuples of
    (y, running_mean, running_var, num_batches_tracked, x grad, w grad, b grad)."""
    out = []
    for fn in ("ours", "ref"):
        xs = x.clone().requires_grad_(True)
        ws = None if w is None else w.clone().requires_grad_(True)
        bs = None if b is None else b.clone().requires_grad_(True)
        rms, rvs = rm.clone(), rv.clone()
        nb = None if nbt is None else nbt.clone()
        if fn == "ours":
            y = switchable_batch_norm(xs, ws, bs, rms, rvs, blocks, rows, training, momentum, eps, activation,
                                      backend=backend, num_batches_tracked=nb)
        else:
            y = ref_switchable_batch_norm(xs, ws, bs, rms, rvs, blocks, rows, training, momentum, eps, activation,
                                          num_batches_tracked=nb)
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape).flip(0)
        (y * gy).sum().backward()
        out.append((y.detach(), rms, rvs, nb, xs.grad, None if ws is None else ws.grad,
                    None if bs is None else bs.grad))
    return out


def assert_same(ours, ref, atol=1e-5, rtol=1e-4):
    names = ("y", "running_mean", "running_var", "num_batches_tracked", "grad_x", "grad_weight", "grad_bias")
    for name, a, r in zip(names, ours, ref):
        if r is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


BACKENDS = [pytest.param("cpp", marks=needs_cpp), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_matches_reference_4d(backend, case, training, activation):
    blocks, rows = CASES[case]
    x, w, b, rm, rv = make(blocks)
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, training, 0.1, activation, backend)
    assert_same(ours, ref)
    if training:  # the rows used really moved, the others did not
        used = {r for r in rows}
        for r in range(rm.shape[0]):
            assert torch.equal(ours[1][r], rm[r]) == (r not in used)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu6"])
def test_matches_reference_2d(backend, training, activation):
    blocks, rows = CASES["full+paradis"]
    x, w, b, rm, rv = make(blocks, spatial=(), n=7, seed=3)
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, training, 0.1, activation, backend)
    assert_same(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [(6,), (2, 3, 4)])
def test_3d_and_5d(backend, spatial):
    blocks, rows = CASES["sandwich"]
    x, w, b, rm, rv = make(blocks, spatial=spatial, seed=5)
    assert_same(*run_both(x, w, b, rm, rv, blocks, rows, True, 0.1, "relu", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cumulative_average_counts_rows_once(backend):
    blocks, rows = CASES["full+paradis"]
    x, w, b, rm, rv = make(blocks)
    nbt = torch.tensor([0, 4, 7])
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, True, None, "relu", backend, nbt=nbt)
    assert_same(ours, ref)
    assert ours[3].tolist() == [1, 5, 7]  # row 1 is shared by two blocks: counted once
    # row 0 had no batches before: the cumulative average is exactly this batch's statistics
    xs = x[:, :8]
    torch.testing.assert_close(ours[1][0], xs.mean((0, 2, 3)))
    torch.testing.assert_close(ours[2][0], xs.var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_with_counter_still_counts(backend):
    blocks, rows = CASES["paradis"]
    x, w, b, rm, rv = make(blocks)
    assert_same(*run_both(x, w, b, rm, rv, blocks, rows, True, 0.3, "none", backend, nbt=torch.zeros(3, dtype=torch.long)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_no_affine(backend, training):
    blocks, rows = CASES["sandwich"]
    x, w, b, rm, rv = make(blocks, affine=False, seed=2)
    assert_same(*run_both(x, w, b, rm, rv, blocks, rows, training, 0.1, "relu", backend))


@needs_cpp
def test_overlapping_blocks_in_eval_sum_affine_grads():
    # The same switch twice reads the same row: fine in eval (read only), grads sum.
    blocks, rows = [(0, 8), (0, 8)], [1, 1]
    x, w, b, rm, rv = make(blocks, seed=4)
    assert_same(*run_both(x, w, b, rm, rv, blocks, rows, False, 0.1, "relu", "cpp"))


@needs_cpp
def test_noncontiguous_inputs():
    blocks, rows = CASES["paradis"]
    x, w, b, rm, rv = make(blocks, spatial=(6, 6), seed=6)
    xc = x.to(memory_format=torch.channels_last)
    wide_w = torch.stack([w, w], 1)  # weight seen through a stride-2 view
    assert not xc.is_contiguous() and not wide_w[:, 0].is_contiguous()
    ours = switchable_batch_norm(xc, wide_w[:, 0], b, rm.clone(), rv.clone(), blocks, rows, True, 0.1, 1e-5, "relu")
    ref = ref_switchable_batch_norm(x, w, b, rm.clone(), rv.clone(), blocks, rows, True, 0.1, 1e-5, "relu")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("spatial", [(1, 1), (2, 2), (3, 5), (7, 9), (9, 13)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_small_maps_tiles_of_channels(spatial, training, threads):
    # Maps under 64 pixels run tiles of channels walked image after image (1024 values a tile,
    # lanes summed in double); larger maps tiles of whole planes with a float sum per channel
    # (9x13: 8 channels a tile). 900 packed channels span several tiles with ragged ends, 300
    # images, and a mean of 50 (eval: 50 from the running mean) tests the shifted sums.
    # Against the per-block float64 reference, as close as torch's float32 batch norm (no
    # activation: a float32 pre-activation within rounding of 0 may pass a ReLU the float64 one
    # stops; the masks are tested at C = 8 above).
    g = torch.Generator().manual_seed(21)
    blocks, rows = [(0, 400), (0, 200), (100, 400)], [0, 1, 2]
    x = torch.randn(300, 900, *spatial, generator=g) * 3 + 50
    w, b = torch.rand(400, generator=g) + 0.5, torch.randn(400, generator=g)
    rm, rv = torch.randn(3, 400, generator=g), torch.rand(3, 400, generator=g) + 0.5
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, ref = run_both(x, w, b, rm, rv, blocks, rows, training, 0.1, "none", "cpp")
    finally:
        torch.set_num_threads(prev)
    _, truth = run_both(x.double(), w.double(), b.double(), rm.double(), rv.double(), blocks, rows, training, 0.1,
                        "none", "torch")
    for i in (0, 1, 2, 4, 5, 6):  # as close to float64 as torch's own float32 batch norm, and close
        err_ours = (ours[i].double() - truth[i]).abs().max().item()
        err_torch = (ref[i].double() - truth[i]).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-5, (i, err_ours, err_torch)
        assert err_ours <= 1e-3 * (1 + truth[i].abs().max().item()), (i, err_ours)


@needs_cpp
def test_blocks_as_tensor_and_large_mean():
    # One-pass statistics must not cancel at a large mean: in float32 we stay as close to
    # the float64 answer as torch's own float32 batch norm does.
    blocks, rows = CASES["sandwich"]
    x, w, b, rm, rv = make(blocks, seed=8, spatial=(16, 16))
    x = x + 1000.0
    bt, rt = torch.tensor(blocks), torch.tensor(rows)
    ours, ref = run_both(x, w, b, rm, rv, bt, rt, True, 0.1, "none", "cpp")
    _, truth = run_both(x.double(), w.double(), b.double(), rm.double(), rv.double(), blocks, rows, True, 0.1,
                        "none", "torch")
    for i in (0, 1, 2, 4, 5, 6):
        err_ours = (ours[i].double() - truth[i]).abs().max().item()
        err_torch = (ref[i].double() - truth[i]).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, (i, err_ours, err_torch)


@needs_cpp
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("spatial", [(2, 3), ()])
def test_gradcheck_float64(training, activation, spatial):
    blocks, rows = CASES["full+paradis"]
    x, w, b, rm, rv = make(blocks, spatial=spatial, n=3, dtype=torch.float64, seed=7)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)

    def f(x, w, b):
        return switchable_batch_norm(x, w, b, rm.clone(), rv.clone(), blocks, rows, training, 0.1, 1e-5, activation)

    assert torch.autograd.gradcheck(f, (x, w, b), atol=1e-6, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    blocks, rows = CASES["full+paradis"]
    x, w, b, rm, rv = make(blocks, n=3, spatial=(2, 2))
    flat = [v for ab in blocks for v in ab]
    op = torch.ops.slimkern.switchable_batch_norm
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), rm, rv, flat, rows, training,
            1e-5, "relu")
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (x.detach(), None, None, rm, rv, flat, rows, training, 1e-5, "none"))
    y, m, v = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    torch.library.opcheck(torch.ops.slimkern.switchable_batch_norm_backward,
                          (torch.randn_like(y), x.detach(), w.detach(), b.detach(), m, v, flat, C, training, 1e-5,
                           "relu"))
    torch.library.opcheck(torch.ops.slimkern.switchable_batch_norm_update_stats_,
                          (rm.clone(), rv.clone(), torch.zeros(3, dtype=torch.long), m, v, flat, rows, 12, None))


# ----------------------------------------------------------------------------- bad inputs

def _bad_calls():
    blocks, rows = CASES["paradis"]
    x, w, b, rm, rv = make(blocks)
    nbt = torch.zeros(3, dtype=torch.long)
    base = dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv, blocks=blocks, stat_rows=rows,
                training=True, momentum=0.1, eps=1e-5, activation="relu", num_batches_tracked=nbt)
    return base, [
        ("stat row out of range", dict(stat_rows=[1, 3]), r"stat_rows\[1\] = 3 is out of range for 3"),
        ("negative stat row", dict(stat_rows=[-1, 1]), r"stat_rows\[0\] = -1 is out of range"),
        ("too few stat rows", dict(stat_rows=[1]), r"stat_rows has 1 entries but there are 2 blocks"),
        ("channels mismatch", dict(x=x[:, :7]), r"x has 7 channels but the blocks hold 8"),
        ("block outside layer", dict(blocks=[(0, 4), (4, 9)]), r"block 1: channel range \[4, 9\) is not inside"),
        ("stop < start", dict(blocks=[(4, 0), (4, 8)]), r"block 0: channel range \[4, 0\)"),
        ("empty block", dict(blocks=[(0, 8), (3, 3)], x=x), r"block 1 is empty"),
        ("no blocks", dict(blocks=[], stat_rows=[]), r"blocks is empty"),
        ("dtype mismatch", dict(weight=w.double()), r"weight and x must .*same dtype"),
        ("weight shape", dict(weight=w[:6]), r"weight must be the full layer's \[8\]"),
        ("running_var shape", dict(running_var=rv[:, :6]), r"running_var must have the shape of running_mean"),
        ("running_mean rank", dict(running_mean=rm[0], running_var=rv[0]), r"running_mean must be \[S, C_full\]"),
        ("cumulative without counter", dict(momentum=None, num_batches_tracked=None),
         r"momentum=None .* needs num_batches_tracked"),
        ("counter shape", dict(num_batches_tracked=torch.zeros(2, dtype=torch.long)),
         r"num_batches_tracked must be \[3\]"),
        ("counter dtype", dict(num_batches_tracked=torch.zeros(3)), r"num_batches_tracked must be an int64"),
        ("shared row overlap", dict(stat_rows=[1, 1], blocks=[(0, 4), (2, 6)]),
         r"blocks 0 and 1 both update channels \[2, 4\) of stat row 1"),
        ("one value per channel", dict(x=x[:1, :, :1, :1]), r"Expected more than 1 value per channel"),
        ("bad activation", dict(activation="gelu"), r"activation must be one of"),
        ("int x", dict(x=x.long()), r"floating-point|float32 and float64"),
        ("float blocks tensor", dict(blocks=torch.tensor([[0.0, 4.0], [4.0, 8.0]])), r"blocks must be an integer"),
        ("blocks tensor shape", dict(blocks=torch.tensor([0, 4, 4, 8])), r"blocks must be a \[G, 2\] tensor"),
    ]


_BASE, _BAD = _bad_calls()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,change,pattern", _BAD, ids=[c[0] for c in _BAD])
def test_bad_inputs_raise_and_write_nothing(backend, name, change, pattern):
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in {**_BASE, **change}.items()}
    before = {k: kw[k].clone() for k in ("running_mean", "running_var", "num_batches_tracked")
              if isinstance(kw[k], torch.Tensor)}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        switchable_batch_norm(backend=backend, **kw)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{k} was written before the error"


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        switchable_batch_norm(backend="cuda", **_BASE)


@needs_cpp
def test_update_op_checks_before_writing():
    rm, rv = torch.zeros(2, 4), torch.ones(2, 4)
    nbt = torch.zeros(2, dtype=torch.long)
    m, v = torch.zeros(4), torch.ones(4)
    op = torch.ops.slimkern.switchable_batch_norm_update_stats_
    with pytest.raises(RuntimeError, match=r"save_var must be \[4\]"):
        op(rm, rv, nbt, m, v[:3], [0, 4], [1], 10, None)
    with pytest.raises(RuntimeError, match=r"count .* must be > 1"):
        op(rm, rv, nbt, m, v, [0, 4], [1], 1, None)
    assert nbt.tolist() == [0, 0] and torch.equal(rm, torch.zeros(2, 4)) and torch.equal(rv, torch.ones(2, 4))


def test_public_name():
    assert slimkern.ops.switchable_batch_norm is switchable_batch_norm


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("spatial", [(5, 7), ()])
def test_cuda_matches_reference(backend, training, activation, spatial):
    blocks, rows = CASES["full+paradis"]
    x, w, b, rm, rv = make(blocks, spatial=spatial, n=6, device="cuda")
    nbt = torch.zeros(3, dtype=torch.long, device="cuda")
    ours, ref = run_both(x, w, b, rm, rv, blocks, rows, training, None if training else 0.1, activation, backend,
                         nbt=nbt)
    assert_same(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_gradcheck_float64():
    blocks, rows = CASES["sandwich"]
    x, w, b, rm, rv = make(blocks, n=3, dtype=torch.float64, device="cuda")
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    f = lambda x, w, b: switchable_batch_norm(x, w, b, rm.clone(), rv.clone(), blocks, rows, True, 0.1, 1e-5,
                                              "relu", backend="cpp")
    assert torch.autograd.gradcheck(f, (x, w, b), atol=1e-6, rtol=1e-5)


def test_backend_choice_and_reasons(monkeypatch):
    from slimkern.ops import switchable_batch_norm as _  # noqa: F401  (the function; module below)
    import importlib

    mod = importlib.import_module("slimkern.ops.switchable_batch_norm")
    x = torch.randn(2, 4)
    expected = "cpp" if _library.has_op("switchable_batch_norm") else "torch"
    assert mod._choose_backend(x, None) == expected
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = mod.not_supported_reasons(x, "triton")
    assert reasons and ("TRITON_INTERPRET=1" in reasons[0] or "not installed" in reasons[0])
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this input"):
        mod._choose_backend(x, "triton")
    if expected == "cpp":
        assert "float32 and float64" in mod.not_supported_reasons(x.half(), "cpp")[0]
