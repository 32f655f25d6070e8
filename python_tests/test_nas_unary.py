"""slimkern.nas.UnaryStats against a hand computation on a fixed two-step schedule."""
import io

import numpy as np
import pytest
import torch

from slimkern.nas import SearchSpace, UnaryStats

SPACE = SearchSpace(groups=("a", "b"), base=(4, 4), full=(4, 4), choices=((2, 4), (1, 2, 4)))


def _two_steps(st):
    # step 1: choices (0, 2); per-image (loss_rand - loss_max) / 2 layers = [1.0, 0.0]
    st.update([0, 2], torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0]))
    # step 2: choices (0, 1); values [0.5, 1.5, 0.5]
    st.update([0, 1], np.array([2.0, 4.0, 1.5]), np.array([1.0, 1.0, 0.5]))


def test_aows_attribution_windowed_average_by_hand():
    st = UnaryStats(SPACE, window=3, attribution="aows", fill=0.0)
    _two_steps(st)
    want = np.array([[(0.5 + 1.5 + 0.5) / 3, 0.0, np.inf],      # (a,0): window keeps the last 3 of 5
                     [0.0, (0.5 + 1.5 + 0.5) / 3, (1.0 + 0.0) / 2]])
    np.testing.assert_allclose(st.unary(), want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(st.counts(), [[3, 0, 0], [0, 3, 2]])
    # window 4: the oldest value (1.0) of (a, 0) is evicted when the second batch arrives
    w4 = UnaryStats(SPACE, window=4)
    _two_steps(w4)
    assert w4.unary()[0, 0] == pytest.approx((0.0 + 0.5 + 1.5 + 0.5) / 4, abs=1e-12)
    assert w4.counts()[0, 0] == 4
    # a long window keeps everything: (1 + 0 + 0.5 + 1.5 + 0.5) / 5
    big = UnaryStats(SPACE, window=100, fill=-7.0)
    _two_steps(big)
    assert big.unary()[0, 0] == pytest.approx(0.7, abs=1e-12)
    assert big.unary()[0, 1] == -7.0  # never sampled: the fill value


def test_loss_attribution_and_switch_paths():
    st = UnaryStats(SPACE, window=10, attribution="loss")
    st.update(SPACE.switch([1, 0]), [2.0, 4.0])  # a per-layer switch: path (1, 0); values loss / 2
    u = st.unary()
    assert u[0, 1] == pytest.approx(1.5) and u[1, 0] == pytest.approx(1.5) and u[0, 0] == 0.0


def test_state_round_trip_and_errors():
    st = UnaryStats(SPACE, window=3)
    _two_steps(st)
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    back = UnaryStats.from_state_dict(SPACE, torch.load(buf, weights_only=False))
    np.testing.assert_array_equal(back.unary(), st.unary())
    other = SearchSpace(("a", "b"), (4, 4), (4, 4), ((2, 4), (2, 4)))
    with pytest.raises(ValueError, match="another search space"):
        UnaryStats(other).load_state_dict(st.state_dict())
    with pytest.raises(ValueError, match="needs loss_max"):
        st.update([0, 0], [1.0])
    with pytest.raises(ValueError, match="one value per image"):
        st.update([0, 0], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        st.update([0, 0], [float("nan")], [1.0])
    with pytest.raises(ValueError, match="out of range"):
        st.update([0, 3], [1.0], [1.0])
    with pytest.raises(ValueError, match="window"):
        UnaryStats(SPACE, window=0)
    with pytest.raises(ValueError, match="attribution"):
        UnaryStats(SPACE, attribution="mean")
