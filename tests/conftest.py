"""Shared fixtures: a tiny CIFAR-like image folder built inside the test, float64 helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from influence_over_inference.study.data import CLASSES


class PicklePayload:
    """Unpickling this object creates the folder ``marker``: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


class FakeSplit:
    """A split of ``n`` random 32x32 uint8 images with labels ``i % 10``, as the LDS experiments read one."""

    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
        self.labels = torch.arange(n) % 10
        self.names = [f"{i}.png" for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def tensors(self, indices=None):
        from influence_over_inference.study.data import normalize_uint8

        x, y = normalize_uint8(self.images), self.labels.clone()
        return (x, y) if indices is None else (x[torch.as_tensor(indices)], y[torch.as_tensor(indices)])


class FakeData:
    """40 training and 20 test images (:class:`FakeSplit`), source "fake"."""

    def __init__(self):
        self.train, self.test, self.source = FakeSplit(40, 0), FakeSplit(20, 1), "fake"


def make_image_folder(root, n_train_per_class=3, n_test_per_class=2, seed=0, suffix=".png"):
    """Write train/<class>/*.png and test/<class>/*.png with random 32x32 RGB images; return the pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            # write in reverse order so directory order differs from the sorted order
            for i in reversed(range(n)):
                arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}{suffix}")
                pixels[(split, cls, i)] = arr
    return pixels


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "cifar"
    pixels = make_image_folder(root)
    return root, pixels


@pytest.fixture(autouse=True)
def _no_env_source(monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests skip on a machine without CUDA (bench/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bash bench/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
