
import numpy as np
import pytest
import torch
from PIL import Image

from influence_over_inference.study import data as data_mod
from influence_over_inference.study.data import (
    CLASSES,
    DataSourceError,
    load_cifar10,
    normalize_uint8,
    users_transform,
)


def test_folder_labels_shapes_range_and_order(image_folder, tmp_path):
    root, pixels = image_folder
    d = load_cifar10(root, cache_dir=tmp_path / "cache")
    assert len(d.train) == 30 and len(d.test) == 20
    # CIFAR-10's label order, then file name: airplane/0000, airplane/0001, ..., truck/0002
    assert d.train.names[:4] == ["airplane/0000.png", "airplane/0001.png", "airplane/0002.png", "automobile/0000.png"]
    assert d.train.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert d.classes == CLASSES
    x, y = d.train[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert -1.0 <= x.min() and x.max() <= 1.0
    # pixels are the ones written (PNG is lossless)
    assert np.array_equal(d.train.images[4].numpy(), pixels[("train", "automobile", 1)])
    assert d.source.startswith("cifar10-folder:") and "JPEG" not in d.source and "/" not in d.source


def test_vectorised_transform_equals_torchvision_transform(image_folder, tmp_path):
    root, _ = image_folder
    d = load_cifar10(root, cache_dir=tmp_path / "cache")
    img = Image.open(root / "train" / "cat" / "0002.png")
    expected = users_transform()(img)
    index = d.train.names.index("cat/0002.png")
    assert torch.allclose(d.train[index][0], expected, atol=1e-6)
    assert torch.allclose(normalize_uint8(d.train.images[index : index + 1])[0], expected, atol=1e-6)


def test_order_is_deterministic_and_cache_hits(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    cache = tmp_path / "cache"
    first = load_cifar10(root, cache_dir=cache)
    assert len(list(cache.glob("cifar10-folder-*.pt"))) == 1

    def no_decode(*_args, **_kw):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    second = load_cifar10(root, cache_dir=cache)  # no_decode proves the cache served it
    assert second.train.names == first.train.names
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.test.labels, first.test.labels)


def test_corrupt_cache_is_rebuilt(image_folder, tmp_path):
    root, _ = image_folder
    cache = tmp_path / "cache"
    first = load_cifar10(root, cache_dir=cache)
    (entry,) = cache.glob("cifar10-folder-*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    again = load_cifar10(root, cache_dir=cache)
    assert torch.equal(again.train.images, first.train.images)


def test_env_var_selects_folder(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    monkeypatch.setenv("CIFAR10_DIR", str(root))
    d = load_cifar10(None, root=tmp_path / "dl")
    assert d.source == load_cifar10(root, cache_dir=tmp_path / "cache").source
    assert d.source.startswith("cifar10-folder:") and str(root) not in d.source


def test_missing_folder_gives_clear_error(tmp_path):
    with pytest.raises(DataSourceError) as err:
        load_cifar10(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "nowhere" in message and "CIFAR10_DIR" in message and "train/<class>" in message


def test_missing_class_folder_gives_clear_error(image_folder, tmp_path):
    root, _ = image_folder
    for f in (root / "test" / "truck").iterdir():
        f.unlink()
    (root / "test" / "truck").rmdir()
    with pytest.raises(DataSourceError, match=r"missing: \['truck'\]"):
        load_cifar10(root, cache_dir=tmp_path / "cache")


def test_malformed_image_gives_clear_error(image_folder, tmp_path):
    root, _ = image_folder
    (root / "train" / "dog" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(DataSourceError, match="0001.png"):
        load_cifar10(root, cache_dir=tmp_path / "cache")


def test_wrong_size_image_gives_clear_error(image_folder, tmp_path):
    root, _ = image_folder
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "train" / "dog" / "0001.png")
    with pytest.raises(DataSourceError, match="32x32"):
        load_cifar10(root, cache_dir=tmp_path / "cache")


def test_torchvision_without_internet_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*_args, **_kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataSourceError) as err:
        load_cifar10("torchvision", root=tmp_path)
    assert "cifar-10-batches-py" in str(err.value) and "CIFAR10_DIR" in str(err.value)


def test_torchvision_source_uses_original_arrays(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert download is True
            n = 5 if train else 3
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
            self.targets = list(range(n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    d = load_cifar10("torchvision", root=tmp_path)
    assert len(d.train) == 5 and len(d.test) == 3
    assert d.train.labels.tolist() == [0, 1, 2, 3, 4]
    assert d.source.startswith("cifar10-torchvision:") and str(tmp_path) not in d.source
    assert int(d.test.images.max()) == 9


def test_subset_keeps_indices(image_folder, tmp_path):
    root, _ = image_folder
    d = load_cifar10(root, cache_dir=tmp_path / "cache")
    sub = d.train.subset(7)
    assert len(sub) == 7 and sub.names == d.train.names[:7]
    assert d.train.subset(None) is d.train


def test_balanced_subset_takes_every_class_and_marks_the_source(image_folder, tmp_path):
    from influence_over_inference.study.data import balanced_subset

    root, _ = image_folder
    d = load_cifar10(root, cache_dir=tmp_path / "cache")
    assert d.train.subset(10).labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # a prefix is class-sorted
    sub = balanced_subset(d, 20)
    assert sub.train.labels.bincount().tolist() == [2] * 10
    assert sub.train.names[:3] == ["airplane/0000.png", "airplane/0001.png", "automobile/0000.png"]
    assert sub.source != d.source and "balanced subset: 2 per class" in sub.source
    assert sub.test is d.test
    assert balanced_subset(d, None) is d
    with pytest.raises(ValueError, match="at least 10"):
        balanced_subset(d, 5)
