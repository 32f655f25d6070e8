"""Straight-through Gumbel-sigmoid: hard forward, the soft sample's gradient."""
import pytest
import torch

from slimkern.prune import gumbel_sigmoid


def test_hard_forward_is_binary_and_matches_the_noise_sign():
    logits = torch.linspace(-3, 3, 50)
    y = gumbel_sigmoid(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0} and 0 < y.sum() < 50
    u = torch.rand(50, generator=torch.Generator().manual_seed(0)).clamp(1e-10, 1 - 1e-10)
    g = torch.log(u) - torch.log1p(-u)  # the logistic noise, drawn independently here
    assert torch.equal(y, (logits + g >= 0).float())


def test_gradient_equals_the_soft_sample_gradient():
    w = torch.randn(40)
    l1 = torch.randn(40, requires_grad=True)
    l2 = l1.detach().clone().requires_grad_(True)
    hard = gumbel_sigmoid(l1, tau=0.7, hard=True, generator=torch.Generator().manual_seed(3))
    soft = gumbel_sigmoid(l2, tau=0.7, hard=False, generator=torch.Generator().manual_seed(3))
    (w * hard).sum().backward()
    (w * soft).sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)
    torch.testing.assert_close(l1.grad, w * soft.detach() * (1 - soft.detach()) / 0.7)  # sigmoid's derivative
    assert not torch.equal(hard.detach(), soft.detach())


def test_soft_sample_is_the_sigmoid_of_noisy_logits_and_tau_sharpens():
    logits = torch.tensor([0.3, -1.0, 2.0])
    u = torch.rand(3, generator=torch.Generator().manual_seed(5)).clamp(1e-10, 1 - 1e-10)
    g = torch.log(u) - torch.log1p(-u)
    for tau in (1.0, 0.1):
        y = gumbel_sigmoid(logits, tau=tau, hard=False, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(y, torch.sigmoid((logits + g) / tau))


@pytest.mark.parametrize("kw, err", [({"tau": 0.0}, ValueError), ({"tau": -1.0}, ValueError),
                                     ({"hard": 1}, TypeError), ({"generator": 3}, TypeError)])
def test_bad_arguments(kw, err):
    with pytest.raises(err):
        gumbel_sigmoid(torch.zeros(3), **kw)
    with pytest.raises(TypeError):
        gumbel_sigmoid(torch.zeros(3, dtype=torch.long))
