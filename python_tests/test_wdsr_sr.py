"""The super-resolution task pieces: photographs, bicubic pairs, PSNR vs scikit-image."""
import numpy as np
import pytest
import torch

from slimkern.data.images import TEST_PHOTOS, TRAIN_PHOTOS, bicubic_down, bicubic_up, load_photo, super_resolution
from slimkern.sr import SRIndividualTrainer, SRParaDiSTrainer, SRSandwichTrainer, psnr, psnr_y, rgb_to_y

skimage = pytest.importorskip("skimage")


def test_photos_load_from_the_wheel():
    for name in TRAIN_PHOTOS + TEST_PHOTOS:
        p = load_photo(name)
        assert p.dim() == 3 and p.shape[0] == 3 and 0 <= p.min() and p.max() <= 1
    assert torch.equal(load_photo("astronaut.png"), torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1) / 255)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_photo("div2k_0001.png")


def test_psnr_matches_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 3, 20, 22, generator=g)
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    ref = peak_signal_noise_ratio(hr[0, :, 2:-2, 2:-2].double().numpy(), sr[0, :, 2:-2, 2:-2].double().numpy(),
                                  data_range=1.0)
    assert psnr(sr, hr, border=2) == pytest.approx(ref, abs=1e-9)
    assert psnr(sr, hr) != pytest.approx(ref, abs=1e-3)  # the border matters: the check is sharp


def test_y_channel_matches_scikit_image():
    from skimage.color import rgb2ycbcr

    x = torch.rand(1, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    ref = rgb2ycbcr(x[0].permute(1, 2, 0).double().numpy())[..., 0] / 255.0
    np.testing.assert_allclose(rgb_to_y(x)[0, 0].double().numpy(), ref, rtol=1e-6, atol=1e-6)
    assert psnr_y(x, x) == float("inf")


def test_split_is_disjoint_and_paired():
    sp = super_resolution(scale=2, patch=16, num_patches=12, test_crop=64, seed=3)
    lr, hr = sp.train.tensors
    assert lr.shape == (12, 3, 8, 8) and hr.shape == (12, 3, 16, 16)
    torch.testing.assert_close(lr, bicubic_down(hr, 2))
    assert [n for n, _, _ in sp.test] == list(TEST_PHOTOS)
    assert all(h.shape == (1, 3, 64, 64) and l.shape == (1, 3, 32, 32) for _, l, h in sp.test)
    again = super_resolution(scale=2, patch=16, num_patches=12, test_crop=64, seed=3)
    assert torch.equal(again.train.tensors[1], hr)
    with pytest.raises(ValueError, match="both train and test"):
        super_resolution(train_photos=("astronaut.png",), num_patches=2)
    with pytest.raises(ValueError, match="multiple"):
        super_resolution(patch=15)
    assert bicubic_up(lr[:1], 2).shape == (1, 3, 16, 16)


def test_recipes_losses_and_arguments():
    from slimkern.models import build

    torch.manual_seed(0)
    net = build("wdsr", width_mult=0.125, n_blocks=1)
    x, y = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 12, 12)
    tr = SRParaDiSTrainer(net, ["[0.5, 0.5]x", "[1.0]x"], beta=1.0, kd=True, progress=False)
    assert [str(s) for s in tr.step_switches()] == ["[1.0]x", "[0.5, 0.5]x"]
    total, terms = tr.loss(x, y)
    with torch.no_grad():
        outs = [net.set_switch(s)(x) for s in tr.step_switches()]
    assert terms["l1 [1.0]x"].item() == pytest.approx((outs[0] - y).abs().mean().item(), rel=1e-5)
    assert terms["kd [0.5, 0.5]x"].item() == pytest.approx((outs[1] - outs[0]).abs().mean().item(), rel=1e-5)
    assert "mse [0.5, 0.5]x" in terms
    assert isinstance(tr.optimizer, torch.optim.Adam)
    us = SRSandwichTrainer(build("wdsr", width_mult=0.125, n_blocks=1), inplace_kd=False, progress=False)
    assert set(us.loss(x, y)[1]) == {"l1_max", "l1_min", "l1_rand1", "l1_rand2"}
    ind = SRIndividualTrainer(build("wdsr", width_mult=0.125, n_blocks=1), "[0.5]x", progress=False)
    assert list(ind.loss(x, y)[1]) == ["l1 [0.5]x"]
    with pytest.raises(ValueError, match="beta"):
        SRParaDiSTrainer(net, ["[1.0]x"], beta=-1)
    with pytest.raises(ValueError, match="full switch"):
        SRParaDiSTrainer(net, ["[0.5, 0.5]x"], beta=1.0)


@pytest.mark.slow
def test_experiment_end_to_end(tmp_path):
    import json

    from slimkern.sr.experiment import run

    rep = run({"seeds": [0], "n_blocks": 1, "width_mult": 0.125, "num_patches": 16, "batch_size": 8, "epochs": 1,
               "patch": 16, "test_crop": 32, "individual": [1.0], "us_widths": [0.5, 1.0], "out": str(tmp_path)})
    for f in ("report.json", "results.csv", "summary.csv", "figure7.png"):
        assert (tmp_path / f).is_file()
    methods = {s["method"] for s in json.load(open(tmp_path / "report.json"))["summary"]}
    assert methods == {"bicubic", "paradis", "us", "individual"}
    par = [s for s in rep["summary"] if s["method"] == "paradis" and s["switch"] == "[0.5, 0.5]x"][0]
    assert par["max_device_macs"] < par["macs"]
