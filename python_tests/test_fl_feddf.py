"""FedDF server distillation (slimkern.fl.feddf) against hand computations: the ensemble is the
averaged logits, a student equal to its teachers does not move, the best snapshot never
scores below the undistilled student, the server MACs are counted as written out by hand."""
import copy

import pytest
import torch
from torch import nn

from slimkern.fl.feddf import FedDF, Teacher, ensemble_logits
from slimkern.fl.models import small_cnn


def _net(seed):
    net = small_cnn(10, 1, (8, 16, 8), seed=seed)
    net.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net(torch.randn(32, 1, 8, 8, generator=g))  # BN statistics for [1.0]
    return net.eval()


def _logits(net, x, sw=None):
    net.eval()
    with torch.no_grad():
        if sw is None:
            return net(x)
        with net.use_switch(sw):
            return net(x)


def test_ensemble_is_the_averaged_logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 8, 8, generator=g)
    a, b = _net(1), _net(2)
    want = (_logits(a, x) + _logits(b, x, "[0.5]x")) / 2
    got = ensemble_logits([Teacher(a), Teacher(b, "[0.5]x")], x, batch_size=7)
    torch.testing.assert_close(got, want)
    want_w = (3 * _logits(a, x) + 1 * _logits(b, x, "[0.5]x")) / 4
    got_w = ensemble_logits([Teacher(a, weight=3), Teacher(b, "[0.5]x", weight=1)], x, weighted=True)
    torch.testing.assert_close(got_w, want_w)


def test_teachers_equal_to_the_student_leave_it_unchanged():
    g = torch.Generator().manual_seed(3)
    unl, x = torch.randn(96, 1, 8, 8, generator=g), torch.randn(40, 1, 8, 8, generator=g)
    student = _net(3)
    before = _logits(student, x)
    teachers = [Teacher(copy.deepcopy(student)) for _ in range(3)]
    # eval-mode student BN: the loss is exactly at its minimum, zero gradient, Adam does not move
    dd = FedDF(unl, steps=30, batch_size=16, eval_every=10, patience=100, student_bn="eval", calibrate="none")
    rep = dd.distill(student, teachers)
    assert rep.steps == 30
    torch.testing.assert_close(_logits(student, x), before, atol=1e-6, rtol=0)
    # the anchor's train-mode BN: batch statistics differ from the teachers' running ones, but the
    # kept snapshot predicts the same classes
    dd = FedDF(unl, steps=30, batch_size=16, eval_every=10, patience=100, calibrate="none")
    dd.distill(student, teachers)
    assert torch.equal(_logits(student, x).argmax(1), before.argmax(1))
    # a different teacher does move it (the check above can fail)
    other = FedDF(unl, steps=30, batch_size=16, eval_every=10, patience=100, student_bn="eval")
    other.distill(student, [Teacher(_net(9))])
    assert (_logits(student, x) - before).abs().max() > 1e-3


def test_distillation_moves_every_switch_toward_the_ensemble_and_keeps_the_best_snapshot():
    g = torch.Generator().manual_seed(4)
    unl = torch.randn(256, 1, 8, 8, generator=g)
    teacher = _net(5)
    student = _net(6)
    sws = ["[1.0]x", "[0.5]x"]
    with torch.no_grad():
        student.train()
        with student.use_switch("[0.5]x"):
            student(unl[:32])  # BN row for [0.5]
    student.eval()
    xv = torch.randn(64, 1, 8, 8, generator=g)
    t = _logits(teacher, xv)
    agree0 = [(_logits(student, xv, s).argmax(1) == t.argmax(1)).float().mean() for s in sws]
    dd = FedDF(unl, val=xv, steps=150, batch_size=32, eval_every=25, patience=1000, lr=3e-3)
    rep = dd.distill(student, [Teacher(teacher)], switches=sws)
    agree1 = [(_logits(student, xv, s).argmax(1) == t.argmax(1)).float().mean() for s in sws]
    assert all(b > a + 0.2 for a, b in zip(agree0, agree1)), (agree0, agree1)
    assert rep.best_score >= rep.initial_score and rep.metric == "-kl"
    # labelled validation split: the kept snapshot scores what the report says, never below the start
    y = torch.randint(0, 10, (64,), generator=g)
    dd = FedDF(unl, val=(xv, y), steps=40, batch_size=32, eval_every=10, patience=1000)
    rep = dd.distill(student, [Teacher(_net(7))], switches=sws)
    acc = sum(float((_logits(student, xv, s).argmax(1) == y).float().mean()) for s in sws) / 2
    assert rep.best_score >= rep.initial_score
    assert acc == pytest.approx(rep.best_score)


def test_server_macs_counted_by_hand_and_drop_worst():
    torch.manual_seed(0)
    lin = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # noqa: E731 - 640 MACs per sample
    unl, val = torch.randn(50, 1, 8, 8), torch.randn(10, 1, 8, 8)
    dd = FedDF(unl, val=val, steps=7, batch_size=8, eval_every=3, patience=100)
    rep = dd.distill(lin(), [Teacher(lin()), Teacher(lin())])
    # plain models: no BN calibration; teachers: 2 x (50 + 10) forwards;
    # student: 3 x 7 x 8 (fwd+bwd) + 10 x (1 + evaluations at 3, 6, 7)
    assert rep.server_macs == 640 * (2 * 60 + 3 * 7 * 8 + 10 * 4)
    y = torch.zeros(10, dtype=torch.long)
    good = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        good[1].weight.zero_()
        good[1].bias.copy_(torch.arange(10, 0, -1).float())  # always predicts class 0
    dd = FedDF(unl, val=(val, y), steps=2, drop_worst=2)
    rep = dd.distill(lin(), [Teacher(lin()), Teacher(good), Teacher(lin())])
    assert rep.dropped == [0, 2] and rep.teachers == 1


def test_bad_input_errors():
    unl = torch.randn(20, 1, 8, 8)
    dd = FedDF(unl, steps=1)
    with pytest.raises(ValueError, match="no teachers"):
        dd.distill(_net(0), [])
    with pytest.raises(TypeError, match="Teacher"):
        dd.distill(_net(0), [_net(1)])
    bad = FedDF(torch.randn(20, 3, 8, 8), steps=1)
    with pytest.raises(ValueError, match="does not fit the student"):
        bad.distill(_net(0), [Teacher(_net(1))])
    with pytest.raises(ValueError, match="at least 2 inputs"):
        FedDF(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="shaped like"):
        FedDF(unl, val=torch.randn(5, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        FedDF(unl, val=(torch.randn(5, 1, 8, 8), torch.zeros(4)))
    with pytest.raises(ValueError, match="NaN"):
        FedDF(torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="drop all"):
        FedDF(unl, drop_worst=1).distill(_net(0), [Teacher(_net(1))])
    with pytest.raises(ValueError, match="logits"):
        dd.distill(_net(0), [Teacher(small_cnn(7, 1, (8, 16, 8)))])


def test_distill_many_shares_one_ensemble_and_server_step_in_simulate():
    from slimkern.fl import make_clients, parse_tiers, simulate
    g = torch.Generator().manual_seed(8)
    unl = torch.randn(64, 1, 8, 8, generator=g)
    teachers = [Teacher(_net(1)), Teacher(_net(2))]
    a, b = _net(3), small_cnn(10, 1, (4, 8, 4), seed=4)
    dd = FedDF(unl, steps=5, batch_size=16, eval_every=5, calibrate="none")
    reps = dd.distill_many([(a, None), (b, None)], teachers)
    assert len(reps) == 2 and all(r.steps == 5 for r in reps)
    # the teachers ran once: only the first report carries their MACs
    assert reps[0].server_macs > reps[1].server_macs
    with pytest.raises(ValueError, match="pairs"):
        dd.distill_many([a], teachers)
    # as simulate's server step: metrics in the round records
    X, Y = torch.randn(80, 1, 8, 8, generator=g), torch.arange(80) % 10
    clients = make_clients(Y.numpy(), parse_tiers("1.0:0.5,0.5:0.5"), 4, "iid", seed=0)
    step = FedDF(X[:40], (X[40:], Y[40:]), steps=4, batch_size=16, eval_every=2, calibrate="both")
    hist = simulate(small_cnn(10, 1, (8, 16, 8), seed=0), (X, Y), (X, Y), clients, "heterofl", rounds=2,
                    batch_size=16, progress=False, calib_set=(X, Y), server_step=step)
    m = hist.rounds[-1].metrics
    assert m["feddf_teachers"] == 4 and m["feddf_steps"] >= 2 and m["feddf_val_after"] >= m["feddf_val_before"]
    assert m["feddf_server_macs"] > 0 and hist.rounds[-1].server_time > 0
