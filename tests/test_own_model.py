"""Your own model and image folder: a residual net with BatchNorm on 3 classes of 16x16 images.

The engine knows nothing of CIFAR-10 or the study's CNN: a folder made here (any class names,
another image size) and a model that is not ``Net`` (a residual connection, BatchNorm, a frozen
first layer) go through the Python API and the ``influence`` command unchanged.
"""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from influence_over_inference import cli
from influence_over_inference.engine import InfluenceEngine, make_solver
from influence_over_inference.engine.hooks import _hooks_supported
from influence_over_inference.engine.params import count_selected
from influence_over_inference.study.data import DataSourceError
from influence_over_inference.study.image_folder import load_image_folder
from influence_over_inference.study.user_model import load_user_model

CLASSES = ("circles", "stripes", "zebra-crossing")  # not CIFAR-10's
SIZE = 16
MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyResNet(nn.Module):
        """conv-BN-ReLU, one residual block, global pooling, a linear head: 3 classes."""

        def __init__(self, width: int = 6, n_classes: int = 3):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv = nn.Conv2d(width, width, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(width)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.head = nn.Linear(4 * width, n_classes)

        def forward(self, x):
            h = torch.relu(self.bn1(self.stem(x)))
            h = torch.relu(h + self.bn2(self.conv(h)))  # the residual connection
            return self.head(self.pool(h).flatten(1))
''')


def _pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if label == 0:
        base = ((xx - 7.5) ** 2 + (yy - 7.5) ** 2 < rng.uniform(10, 40)) * 200
    elif label == 1:
        base = ((xx // rng.integers(2, 4)) % 2) * 200
    else:
        base = ((yy // rng.integers(2, 4)) % 2) * 200
    image = np.stack([base, np.roll(base, 1, axis=1), 255 - base], axis=-1) + rng.normal(0, 40, (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 70 training and x 10 test PNGs of 16x16, plus a Jupyter checkpoint folder to ignore."""
    root = tmp_path_factory.mktemp("own_images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 70), ("test", 10)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_pattern(label, rng)).save(root / split / name / f"{i:03d}.png")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """The model module written to a folder of its own, trained briefly; its state_dict saved."""
    home = tmp_path_factory.mktemp("own_model")
    (home / "own_models.py").write_text(MODEL_SOURCE)
    data = load_image_folder(folder, progress=False)
    torch.manual_seed(0)
    spec = importlib.util.spec_from_file_location("own_models", home / "own_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TinyResNet()
    x, y = data.train.tensors()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    for step in range(100):
        idx = torch.randint(0, len(y), (32,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), home / "weights.pt")
    return home, data, model


def test_any_image_folder_loads_with_its_own_classes_and_size(folder):
    data = load_image_folder(folder, progress=False)
    assert data.classes == sorted(CLASSES)
    assert data.train.images.shape == (210, 3, SIZE, SIZE) and len(data.test) == 30
    assert data.train.names[0] == "circles/000.png"
    assert "/" not in data.source.split(":", 1)[1].split("#")[0]  # named by folder name + fingerprint, no path
    with pytest.raises(DataSourceError, match="train/"):
        load_image_folder(folder / "train", progress=False)


def test_fast_at_full_rank_equals_exact_on_a_residual_batchnorm_net(trained, monkeypatch):
    home, data, model = trained
    monkeypatch.chdir(home)
    model, _ = load_user_model("own_models:TinyResNet", "weights.pt")
    model = model.double()
    model.stem.requires_grad_(False)  # a frozen layer is not scored
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_selected(model) == trainable < sum(p.numel() for p in model.parameters())
    assert not _hooks_supported(model, None)  # BatchNorm's parameters: the torch.func path, automatically
    train = (data.train.images.double(), data.train.labels)
    x, y = data.test.images[:4].double(), data.test.labels[:4]
    exact = InfluenceEngine(model, train, make_solver("exact", damping=0.01), weight_decay=1e-3, cache_dir=None)
    fast = InfluenceEngine(model, train, make_solver("fast", damping=0.01, n_samples=len(train[1]), rank=10_000),
                           weight_decay=1e-3, cache_dir=None)
    a, b = exact.scores(x, y), fast.scores(x, y)  # (4, 210)
    assert model.training is False
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-8, rel
    assert torch.equal(exact.top_k(x, y, 5).harmful, fast.top_k(x, y, 5).harmful)


def test_influence_command_with_your_model_prints_files_by_name(trained, folder, monkeypatch, capsys):
    home, data, _ = trained
    monkeypatch.chdir(home)
    rc = cli.main(["influence", "--model", "own_models:TinyResNet", "--checkpoint", "weights.pt", "--data", str(folder),
                   "--test-index", "0", "12", "--k", "3", "--weight-decay", "1e-3", "--no-cache", "--out", "report"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "label circles" in out and "most helpful" in out and "most harmful" in out
    listed = [line.split()[-1] for line in out.splitlines() if line.strip().endswith(".png") and line.split()[0].isdigit()]
    assert len(listed) == 2 * 2 * 3 and all(name.split("/")[0] in CLASSES for name in listed)
    report = (home / "report.json").read_text()
    assert "TinyResNet" in report and str(folder) not in report


def test_bad_model_specs_say_what_to_do(trained, folder, monkeypatch, capsys):
    home, _, _ = trained
    monkeypatch.chdir(home)
    for spec, message in (("own_models", "package.module:factory"), ("own_models:Nope", "no attribute"),
                          ("no_such_module:X", "cannot import")):
        rc = cli.main(["influence", "--model", spec, "--checkpoint", "weights.pt", "--data", str(folder), "--no-cache"])
        assert rc == 2
        assert message in capsys.readouterr().err
