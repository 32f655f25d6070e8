"""Aggregation rules vs hand computations on a tiny 3-layer model.

Parameters (out, in): conv.weight [4, 1] (the image input is never sliced),
h.weight [4, 4], h.bias [4], fc.weight [3, 4], fc.bias [3] (the class output never sliced).
Windows are written out by hand, as parameter_ranges gives them for 4 channels.
"""
import math

import pytest
import torch

from slimkern.fl import (Aggregator, ClientUpdate, aggregate_loop, clustered, fedavg, fedrolex,
                         heterofl, paradis, rolling_window)

S = slice


def windows_of(ranges):
    """Windows of a switch given as channel ranges [(a, b), ...] (one per branch)."""
    w = {"conv.weight": [], "h.weight": [], "h.bias": [], "fc.weight": [], "fc.bias": []}
    for a, b in ranges:
        w["conv.weight"].append((S(a, b), S(0, 1)))
        w["h.weight"].append((S(a, b), S(a, b)))
        w["h.bias"].append((S(a, b),))
        w["fc.weight"].append((S(0, 3), S(a, b)))
        w["fc.bias"].append((S(0, 3),))  # every branch lists the bias; it is added once
    return w


SWITCHES = {"full": [(0, 4)], "half": [(0, 2)], "pd": [(0, 2), (2, 4)], "quarter": [(0, 1)],
            "roll3": [(3, 4), (0, 1)], "mid": [(1, 3)]}


def windows(sw):
    return windows_of(SWITCHES[sw])


def params0():
    g = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (4, 1), "h.weight": (4, 4), "h.bias": (4,), "fc.weight": (3, 4), "fc.bias": (3,)}
    return {n: torch.randn(*s, generator=g) for n, s in shapes.items()}


def const_update(client, sw, value, n):
    sliced = {name: [torch.full(p[win].shape, float(value)) for win in wins]
              for name, wins in windows(sw).items() for p in [params0()[name]]}
    return ClientUpdate(client, sw, sliced, n)


def test_heterofl_paradis_hand_numbers():
    p = params0()
    ups = [const_update(0, "full", 1.0, 1), const_update(1, "half", 5.0, 3), const_update(2, "pd", 10.0, 2)]
    new, rep = paradis(p, ups, windows)
    assert rep.accepted == [0, 1, 2] and not rep.rejected
    H = new["h.weight"]
    # top-left block: all three clients (1*1 + 3*5 + 2*10) / 6 = 6
    assert torch.allclose(H[:2, :2], torch.full((2, 2), 6.0))
    # bottom-right block: full and pd (1*1 + 2*10) / 3 = 7
    assert torch.allclose(H[2:, 2:], torch.full((2, 2), 7.0))
    # off-diagonal blocks: only the full client
    assert torch.allclose(H[:2, 2:], torch.ones(2, 2)) and torch.allclose(H[2:, :2], torch.ones(2, 2))
    # classifier bias: trained by everyone, counted once per client: 36/6
    assert torch.allclose(new["fc.bias"], torch.full((3,), 6.0))
    assert torch.allclose(new["fc.weight"][:, :2], torch.full((3, 2), 6.0))
    assert torch.allclose(new["fc.weight"][:, 2:], torch.full((3, 2), 7.0))
    assert torch.allclose(new["conv.weight"][2:], torch.full((2, 1), 7.0))


def test_untrained_elements_keep_value():
    p = params0()
    ups = [const_update(0, "half", 2.0, 4), const_update(1, "quarter", 8.0, 1)]
    # HeteroFL's reference combine() counts clients (count += 1): the plain mean by default
    assert heterofl(p, ups, windows)[0]["h.weight"][0, 0].item() == pytest.approx((2 + 8) / 2)
    new, rep = heterofl(p, ups, windows, weighting="samples")
    H = new["h.weight"]
    assert H[0, 0].item() == pytest.approx((4 * 2 + 8) / 5)
    assert torch.allclose(H[:2, :2].flatten()[1:], torch.full((3,), 2.0))
    assert torch.equal(H[2:, :], p["h.weight"][2:, :]) and torch.equal(H[:, 2:], p["h.weight"][:, 2:])
    assert torch.equal(new["h.bias"][2:], p["h.bias"][2:])
    assert rep.updated_elements == 2 + 4 + 2 + 6 + 3


def test_rolling_windows_and_wraparound():
    assert rolling_window(0.5, 0, 0.25) == [(0.0, 0.5)]
    assert rolling_window(0.5, 1, 0.25) == [(0.25, 0.75)]
    assert rolling_window(0.5, 2, 0.25) == [(0.5, 1.0)]
    assert rolling_window(0.5, 3, 0.25) == [(0.75, 1.0), (0.0, 0.25)]
    assert rolling_window(0.5, 4, 0.25) == [(0.0, 0.5)]
    assert rolling_window(1.0, 3, 0.25) == [(0.0, 1.0)]
    assert rolling_window(0.3, 1, 0.1) == [(0.1, 0.4)]
    p = params0()
    # FedRolex's wrapped window as its reference trains it: the dense sub-matrix on the index
    # set idx = roll(arange(4), 1)[:2] = [3, 0] (cross blocks included), overlapping an offset
    # window (channels 1, 2) and a quarter (channel 0); each element the mean over clients
    idx = torch.roll(torch.arange(4), 1)[:2]
    assert idx.tolist() == [3, 0]
    dense = {"conv.weight": [(idx, S(0, 1))], "h.weight": [(idx[:, None], idx[None, :])], "h.bias": [(idx,)],
             "fc.weight": [(S(0, 3), idx)], "fc.bias": [(S(0, 3),)]}

    def wins(sw):
        return dense if sw == "dense3" else windows(sw)
    ups = [ClientUpdate(0, "dense3", {n: [torch.full(p[n][w].shape, 3.0) for w in ws] for n, ws in dense.items()}, 2),
           const_update(1, "mid", 6.0, 1), const_update(2, "quarter", 9.0, 1)]
    new, _ = fedrolex(p, ups, wins)
    H = new["h.weight"]
    want = p["h.weight"].clone()
    want[1:3, 1:3] = 6.0
    want[idx[:, None], idx[None, :]] = 3.0  # (3, 3), (3, 0), (0, 3), (0, 0)
    want[0, 0] = (3 + 9) / 2
    torch.testing.assert_close(H, want)
    assert new["h.bias"].tolist() == pytest.approx([6.0, 6.0, 6.0, 3.0])
    assert new["fc.bias"].tolist() == pytest.approx([(3 + 6 + 9) / 3] * 3)
    assert new["fc.weight"][:, 0].tolist() == pytest.approx([6.0] * 3)


@pytest.mark.parametrize("weighting", ["samples", "clients"])
def test_matches_elementwise_reference_random(weighting):
    """Random values, mixed switches, vs the element-wise mean written with masks from the
    switches' channel ranges (not from ``windows``): per branch ``(a, b)`` a client holds
    conv rows ``a:b``, the diagonal block ``h[a:b, a:b]``, ``h.bias[a:b]``, the classifier
    columns ``a:b`` and a copy of the classifier bias (a client's copies are averaged)."""
    p = params0()
    g = torch.Generator().manual_seed(5)
    sws = ["full", "half", "pd", "quarter", "roll3", "mid", "half", "pd"]
    ups, held = [], []
    for k, sw in enumerate(sws):
        vals = {n: [] for n in p}
        V = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in p.items()}
        M = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in p.items()}
        copies = []
        for a, b in SWITCHES[sw]:
            for name, block in (("conv.weight", (S(a, b), S(0, 1))), ("h.weight", (S(a, b), S(a, b))),
                                ("h.bias", (S(a, b),)), ("fc.weight", (S(0, 3), S(a, b)))):
                t = torch.randn(p[name][block].shape, generator=g)
                vals[name].append(t)
                V[name][block] = t.double()
                M[name][block] = True
            copies.append(torch.randn(3, generator=g))
        vals["fc.bias"] = copies
        V["fc.bias"] = torch.stack(copies).double().mean(0)
        M["fc.bias"][:] = True
        ups.append(ClientUpdate(k, sw, vals, float(k + 1)))
        held.append((V, M, float(k + 1) if weighting == "samples" else 1.0))
    new, _ = paradis(p, ups, windows, weighting=weighting)
    for name, P in p.items():
        num = sum(w * M[name] * V[name] for V, M, w in held)
        den = sum(w * M[name].double() for V, M, w in held)
        want = torch.where(den > 0, num / den.clamp_min(1e-30), P.double()).float()
        torch.testing.assert_close(new[name], want, rtol=1e-5, atol=1e-6, msg=name)
    if weighting == "samples":
        loop = aggregate_loop(p, ups, windows)
        for n in p:
            torch.testing.assert_close(loop[n], new[n])


def test_flat_and_mask_forms_agree():
    p = params0()
    agg = Aggregator.for_params(p, windows)
    g = torch.Generator().manual_seed(1)
    trained = {n: t + torch.randn(t.shape, generator=g) for n, t in p.items()}
    flat_u = ClientUpdate(0, "pd", agg.extract(trained, "pd"), 3)
    sliced_u = ClientUpdate(0, "pd", agg.extract_sliced(trained, "pd"), 3)
    mask = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in p.items()}
    for name, wins in windows("pd").items():
        for w in wins:
            mask[name][w] = True
    mask_u = ClientUpdate(0, "pd", trained, 3, mask=mask)
    other = ClientUpdate(1, "half", agg.extract(p, "half") + 1.0, 2)
    r1, _ = agg.aggregate(p, [flat_u, other])
    r2, _ = agg.aggregate(p, [sliced_u, other])
    r3, _ = agg.aggregate(p, [mask_u, other])
    for n in p:
        torch.testing.assert_close(r1[n], r2[n])
        torch.testing.assert_close(r1[n], r3[n])
    assert agg.num_elements("pd") == 4 + 8 + 4 + 12 + 3
    assert agg.num_elements("full") == sum(t.numel() for t in p.values())


def test_fedavg_plain_mean_and_mixed_switch_error():
    p = params0()
    agg = Aggregator.for_params(p, windows)
    a, b = agg.extract(p, "full") * 0 + 1.0, agg.extract(p, "full") * 0 + 4.0
    new, _ = fedavg(p, [ClientUpdate(0, "full", a, 1), ClientUpdate(1, "full", b, 2)], agg)
    assert all(torch.allclose(t, torch.full_like(t, 3.0)) for t in new.values())
    # a client of another switch is rejected with the reason, the round goes on
    new, rep = fedavg(p, [ClientUpdate(0, "full", a, 1), const_update(1, "half", 1.0, 1)], windows)
    assert rep.accepted == [0] and rep.rejected[0][0] == 1 and "one switch" in rep.rejected[0][1]
    assert all(torch.equal(t, torch.full_like(t, 1.0)) for t in new.values())


def test_clustered_groups_are_separate_models():
    p = params0()
    groups = {"full": p, "half": {n: t.clone() for n, t in p.items()}}
    new, reports = clustered(groups, [const_update(0, "full", 2.0, 1), const_update(1, "full", 4.0, 1),
                                      const_update(2, "half", 7.0, 5)], windows)
    assert torch.allclose(new["full"]["h.weight"], torch.full((4, 4), 3.0))
    assert torch.allclose(new["half"]["h.weight"][:2, :2], torch.full((2, 2), 7.0))
    assert torch.equal(new["half"]["h.weight"][2:], p["h.weight"][2:])
    assert reports["full"].accepted == [0, 1] and reports["half"].accepted == [2]


def test_faults_rejected_and_model_finite():
    p = params0()
    agg = Aggregator.for_params(p, windows)
    good = ClientUpdate(0, "half", agg.extract(p, "half") + 1.0, 2)
    nan = agg.extract(p, "full")
    nan[3] = float("nan")
    inf = agg.extract(p, "half")
    inf[0] = float("inf")
    bad_shape = agg.extract_sliced(p, "half")
    bad_shape["h.weight"] = [torch.zeros(3, 2)]
    ups = [good,
           ClientUpdate(1, "full", nan, 5),
           ClientUpdate(2, "half", inf, 5),
           ClientUpdate(3, "half", bad_shape, 5),
           ClientUpdate(4, "full", agg.extract(p, "half"), 5),  # length of another switch
           ClientUpdate(5, "full", agg.extract(p, "full"), 5),  # switch not assigned
           ClientUpdate(6, "half", agg.extract(p, "half"), 0),
           ClientUpdate(0, "half", agg.extract(p, "half"), 1),  # second update of client 0
           ClientUpdate(9, "half", agg.extract(p, "half"), 1)]  # not selected
    assigned = {0: "half", 1: "full", 2: "half", 3: "half", 4: "full", 5: "half", 6: "half"}
    logged = []
    new, rep = agg.aggregate(p, ups, assigned=assigned, log=logged.append)
    assert rep.accepted == [0]
    reasons = dict(rep.rejected)
    assert "NaN" in reasons[1] and "1 NaN" in reasons[1]
    assert "inf" in reasons[2]
    assert "shape (3, 2), expected (2, 2)" in reasons[3] and "h.weight" in reasons[3]
    assert "flat vector of" in reasons[4]
    assert "assigned half" in reasons[5]
    assert "num_samples" in reasons[6]
    assert "more than one update" in reasons[0]
    assert "not selected" in reasons[9]
    assert len(logged) == 8
    assert all(torch.isfinite(t).all() for t in new.values())
    torch.testing.assert_close(new["h.weight"][:2, :2], p["h.weight"][:2, :2] + 1.0)


def test_nobody_returns_leaves_model_unchanged():
    p = params0()
    logged = []
    new, rep = heterofl(p, [], windows, log=logged.append)
    assert rep.empty and "unchanged" in rep.summary() and logged
    assert all(torch.equal(new[n], p[n]) for n in p)


def test_bad_window_error():
    p = params0()
    with pytest.raises(ValueError, match="window .* does not index parameter 'h.bias'"):
        Aggregator.for_params(p, {"x": {"h.bias": [(S(0, 1), S(0, 1))]}}).layout("x")
