"""DAC eq. 1 / eq. 2 against hand computations, including the sign of eq. 2."""
import math

import pytest
import torch

from slimkern.prune import bound_loss, entropy_loss


def test_entropy_hand_computed():
    g = [torch.zeros(2), torch.tensor([0.0, math.log(3.0)]), torch.tensor([5.0])]
    # uniform over 2 -> log 2; softmax([0, log 3]) = [1/4, 3/4]; a single channel -> 0
    expected = math.log(2) - (0.25 * math.log(0.25) + 0.75 * math.log(0.75)) + 0.0
    assert entropy_loss(g).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_gradient_pushes_gates_apart():
    w = torch.tensor([0.4, 0.6], requires_grad=True)
    entropy_loss([w]).backward()
    assert w.grad[0] > 0 > w.grad[1]  # descent lowers the low gate, raises the high one


def test_bound_hand_computed():
    g = [torch.tensor([-0.5, 0.3, 1.2, 0.0, 1.0]), torch.tensor([2.0])]
    assert bound_loss(g).item() == pytest.approx(0.5 + 0.2 + 1.0, rel=1e-6)
    assert bound_loss([torch.rand(7)]).item() == 0.0


def test_bound_sign_penalises_out_of_range_and_printed_minus_would_reward_it():
    w = torch.tensor([-0.5, 0.3, 1.2], requires_grad=True)
    bound_loss([w]).backward()
    assert w.grad.tolist() == [-1.0, 0.0, 1.0]
    after = w.detach() - 0.1 * w.grad  # one gradient step on the intended penalty
    assert after[0] > -0.5 and after[2] < 1.2  # both move back towards [0, 1]
    w2 = w.detach().clone().requires_grad_(True)
    (-bound_loss([w2])).backward()  # eq. 2 as printed
    printed = w2.detach() - 0.1 * w2.grad
    assert printed[0] < -0.5 and printed[2] > 1.2  # rewarded for leaving the range
    assert bound_loss([after]) < bound_loss([w.detach()]) < bound_loss([printed])


@pytest.mark.parametrize("fn", [entropy_loss, bound_loss])
@pytest.mark.parametrize("bad, err", [(torch.zeros(3), TypeError), ([], ValueError),
                                      ([torch.zeros(2, 2)], ValueError), ([torch.zeros(0)], ValueError),
                                      ([torch.zeros(3, dtype=torch.long)], TypeError), ([[0.1, 0.2]], ValueError)])
def test_bad_gates(fn, bad, err):
    with pytest.raises(err):
        fn(bad)
