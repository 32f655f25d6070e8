"""slimkern.fl.augment.RandomAffine against hand-placed pixels, and simulate(augment=...)."""
import numpy as np
import pytest
import torch

from slimkern.fl import make_clients, parse_tiers, simulate
from slimkern.fl.augment import RandomAffine
from slimkern.fl.models import small_cnn


def _impulse(n=3, size=8, at=(3, 4)):
    x = torch.full((n, 1, size, size), -0.5)
    x[:, :, at[0], at[1]] = 2.0
    return x


def test_zero_ranges_are_identity():
    x = torch.randn(5, 2, 8, 8)
    y = RandomAffine(0, 0, 0, fill=-0.5)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_whole_pixel_shift_moves_the_impulse(monkeypatch):
    # every uniform draw at its upper end (u = 1): output(p) = input(p + 1 px), the impulse moves by -1
    aug = RandomAffine(0, 1, 0, fill=-0.5)
    x = _impulse()
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(3, 4, dtype=torch.float64))
    y = aug(x)
    monkeypatch.undo()
    want = _impulse(at=(2, 3))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)


def test_rotation_keeps_background_and_is_seeded():
    aug = RandomAffine(30, 1.5, 0.2, fill=-0.5)
    x = _impulse(n=16)
    y1 = aug(x, torch.Generator().manual_seed(4))
    y2 = aug(x, torch.Generator().manual_seed(4))
    y3 = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # corners stay blank (the fill value), values are convex mixes of -0.5 and 2.0
    assert torch.allclose(y1[:, :, 0, 0], torch.tensor(-0.5))
    assert float(y1.min()) >= -0.5 - 1e-5 and float(y1.max()) <= 2.0 + 1e-5
    assert len({tuple(torch.nonzero(y1[i, 0] > 0).flatten().tolist()) for i in range(16)}) > 1
    assert "rotate=30" in repr(aug)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rotate must be a finite number >= 0"):
        RandomAffine(-1)
    with pytest.raises(ValueError, match="scale must be < 1"):
        RandomAffine(0, 0, 1.0)
    with pytest.raises(ValueError, match=r"expected a float \[N, C, H, W\] tensor"):
        RandomAffine()(torch.zeros(8, 8))


def test_simulate_applies_augment_and_resumes_identically(tmp_path):
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    Y = torch.tensor(d.target)
    train, test = (X[:200], Y[:200]), (X[1600:1700], Y[1600:1700])
    clients = make_clients(train[1].numpy(), parse_tiers("1.0:0.5,0.5:0.5"), 4, "iid", seed=0)
    calls = []

    class Counting(RandomAffine):
        def __call__(self, x, generator=None):
            calls.append(x.shape[0])
            return super().__call__(x, generator)

    def run(augment, rounds, **kw):
        net = small_cnn(channels=(4, 8, 8), seed=0)
        simulate(net, train, test, clients, "heterofl", rounds=rounds, local_epochs=1, lr=0.1, batch_size=25,
                 seed=1, progress=False, augment=augment, **kw)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    plain = run(None, 2)
    aug = run(Counting(15, 1, 0.1, fill=-0.75), 2)
    assert sum(calls) == 2 * 200  # every local sample of every round went through it
    assert not torch.equal(plain, aug)
    ck = str(tmp_path / "ck.pt")

    class Kill(BaseException):  # the run is killed in round 1 (the checkpoint holds round 0)
        pass

    def kill(r, u):
        if r == 1:
            raise Kill()
        return u

    with pytest.raises(Kill):
        run(RandomAffine(15, 1, 0.1, fill=-0.75), 2, checkpoint=ck, fault_fn=kill)
    resumed = run(RandomAffine(15, 1, 0.1, fill=-0.75), 2, checkpoint=ck, resume=True)
    assert torch.equal(resumed, aug)
    with pytest.raises(ValueError, match="belongs to another run"):
        run(RandomAffine(5, 1, 0.1, fill=-0.75), 2, checkpoint=ck, resume=True)
