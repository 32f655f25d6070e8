"""slimkern.nas search space and pairwise costs: the chain tables equal slimkern.profile."""
import numpy as np
import pytest

import slimkern as sk
from slimkern.nas import cost_model, search_space


@pytest.fixture(scope="module")
def mnv1():
    net = sk.models.mobilenet_v1(num_classes=10, width_mult=0.25, max_width=1.5).eval()
    space = search_space(net, divisor=2)
    return net, space, cost_model(net, space, (2, 3, 16, 16))


def test_chain_and_aows_choices():
    net = sk.models.mobilenet_v1(num_classes=10, width_mult=0.5, max_width=1.5)
    sp = search_space(net)  # AOWS: divisor 8, linspace(0.2, 1.5, 14)
    assert sp.groups == ("stem",) + tuple(f"b{i}" for i in range(1, 14))
    i = sp.groups.index("b2")
    assert sp.base[i] == 64 and sp.full[i] == 96
    # hand computed: 8 * floor(64 f / 8 + 1/2) for f in linspace(0.2, 1.5, 14), de-duplicated
    assert sp.choices[i] == (16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96)
    capped = search_space(sk.models.mobilenet_v1(width_mult=0.5), fractions=[0.5, 1.0, 1.5], divisor=8)
    assert capped.choices[i] == (32, 64)  # 1.5x caps at the allocated 1.0x width
    # half rounds to the nearest multiple: 0.3 * 32 = 9.6 -> 8; below the divisor: round(0.2 * 8) = 2
    assert search_space(net, fractions=[0.3, 1.0]).choices[sp.groups.index("b1")] == (8, 32)
    small = search_space(sk.models.mobilenet_v1(width_mult=0.25), fractions=[0.2, 1.0], divisor=8)
    assert small.choices[0] == (2, 8)
    with pytest.raises(ValueError, match="do not form a chain"):
        search_space(sk.models.resnet20(width_mult=0.25))
    with pytest.raises(ValueError, match="divisor"):
        search_space(net, divisor=0)
    with pytest.raises(ValueError, match="fractions"):
        search_space(net, fractions=[])


def test_totals_equal_profile_on_random_configurations(mnv1):
    net, sp, cm = mnv1
    rng = np.random.default_rng(0)
    paths = [sp.min_path(), sp.max_path()] + [[int(rng.integers(len(c))) for c in sp.choices] for _ in range(4)]
    for path in paths:
        prof = sk.profile(net, sp.switch(path), input_size=(2, 3, 16, 16))
        assert cm.of_path(path, "macs") == prof.macs
        assert cm.of_path(path, "params") == prof.params
        assert cm.of_path(path, "peak_activation") == prof.peak_activation_bytes
        T = {k: cm.table(k) for k in ("macs", "params", "peak_activation")}
        steps = list(zip(range(len(path) - 1), path[:-1], path[1:]))
        assert sum(T["macs"][l, i, j] for l, i, j in steps) == prof.macs
        assert sum(T["params"][l, i, j] for l, i, j in steps) == prof.params
        assert max(T["peak_activation"][l, i, j] for l, i, j in steps) == prof.peak_activation_bytes


def test_padding_uniform_and_errors(mnv1):
    net, sp, cm = mnv1
    T = cm.table("macs")
    assert T.shape == (sp.num_layers - 1, sp.max_choices, sp.max_choices)
    n0 = len(sp.choices[0])
    assert np.isinf(T[0, n0:, :]).all() and np.isfinite(T[0, :n0, :len(sp.choices[1])]).all()
    uni = sp.uniform_channels(1.0)
    assert cm.evaluate(uni, "macs") == sk.profile(net, sk.Switch([1.0]), (2, 3, 16, 16)).macs
    assert sp.path(sp.switch([1] * sp.num_layers)) == [1] * sp.num_layers
    with pytest.raises(ValueError, match="latency"):
        cm.table("latency")
    with pytest.raises(ValueError, match="cost must be one of"):
        cm.table("flops")
    with pytest.raises(ValueError, match="no channels for groups"):
        cm.evaluate({"stem": 4})
    with pytest.raises(ValueError, match="out of range"):
        sp.channels([99] * sp.num_layers)
