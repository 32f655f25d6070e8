"""slimkern.data: digits split, CIFAR pickle reader, ImageFolder errors, tensor augmentation."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimkern import data as D


def test_digits_shapes_split_and_normalisation():
    s = D.digits(image_size=16, channels=3, test_fraction=0.25, seed=0)
    xtr, ytr = s.train.tensors
    xte, yte = s.test.tensors
    assert xtr.shape[1:] == (3, 16, 16) and xte.shape[1:] == (3, 16, 16)
    assert len(xtr) + len(xte) == 1797
    # stratified: every class's test count is round(0.25 * n_c)
    from sklearn.datasets import load_digits
    counts = np.bincount(load_digits().target)
    assert torch.equal(torch.bincount(yte, minlength=10), torch.tensor([round(0.25 * c) for c in counts]))
    # channels are copies; train split standardised (mean 0, std 1)
    assert torch.equal(xtr[:, 0], xtr[:, 2])
    assert abs(float(xtr.mean())) < 1e-5 and abs(float(xtr.std()) - 1) < 1e-4
    assert s.input_size == (1, 3, 16, 16) and s.num_classes == 10


def test_digits_matches_hand_resize_and_is_seeded():
    from sklearn.datasets import load_digits
    raw = load_digits()
    s = D.digits(image_size=8, channels=1, normalize=False, seed=3)
    x, y = s.train.tensors
    # image_size=8: no resize, so each training image is exactly a raw image / 16
    pool = torch.from_numpy(raw.images[raw.target == int(y[0])] / 16.0).float()
    assert any(torch.equal(x[0, 0], p) for p in pool)
    s2 = D.digits(image_size=8, channels=1, normalize=False, seed=3)
    s3 = D.digits(image_size=8, channels=1, normalize=False, seed=4)
    assert torch.equal(s2.test.tensors[0], s.test.tensors[0])
    assert not torch.equal(s3.test.tensors[0], s.test.tensors[0])
    # resize is bilinear F.interpolate of the raw 8x8
    r = D.digits(image_size=12, channels=1, normalize=False, seed=3, test_fraction=0.25)
    ref = F.interpolate(x[:1], size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(r.train.tensors[0][:1], ref)


def test_digits_bad_args():
    with pytest.raises(ValueError, match="image_size"):
        D.digits(image_size=2)
    with pytest.raises(ValueError, match="test_fraction"):
        D.digits(test_fraction=1.5)


def _write_cifar10(folder, n=6):
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=n))
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
        batches[name] = (data, labels)
    return batches


def test_cifar10_reader(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    s = D.cifar10(tmp_path, augment=False)
    assert len(s.train) == 30 and len(s.test) == 6
    x, y = s.test[2]
    data, labels = batches["test_batch"]
    raw = torch.from_numpy(data[2].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std) and int(y) == labels[2]
    # second training batch starts at index n
    assert torch.equal(s.train.images[6], torch.from_numpy(batches["data_batch_2"][0][0].reshape(3, 32, 32)))
    # the inner folder itself works as root, and augmentation is attached to train only
    s2 = D.cifar10(tmp_path / "cifar-10-batches-py", augment=True)
    assert isinstance(s2.train.transform, D.CifarAugment) and s2.test.transform is None


def test_missing_roots_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        D.cifar10(missing)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*train"):
        D.cifar100(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        D.image_folder(missing)
    os.makedirs(tmp_path / "imgs" / "train")
    with pytest.raises(FileNotFoundError, match=r"imgs.*val"):
        D.image_folder(tmp_path / "imgs")


def test_random_crop_flip_equals_pad_crop_flip_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 6, 7)
    out = D.random_crop_flip(x, padding=2, generator=g)
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (5,), generator=g)
    dx = torch.randint(0, 5, (5,), generator=g)
    flips = torch.rand(5, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(5):
        ref = padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    # a single image keeps its shape; padding 0 without flip is the identity
    assert D.random_crop_flip(x[0], 4).shape == x[0].shape
    assert torch.equal(D.random_crop_flip(x, 0, flip=False), x)
    with pytest.raises(ValueError, match="expected"):
        D.random_crop_flip(torch.zeros(3, 3))
