import json

import pytest
import torch

import helpers
from influence_over_inference.cli import main
from influence_over_inference.study.data import load_cifar10
from influence_over_inference.study.training import TrainConfig, train_or_load


def test_helpers_save_load_test(tmp_path, image_folder, capsys):
    root, _ = image_folder
    data = load_cifar10(root, cache_dir=tmp_path / "cache")
    net = helpers.Net()
    helpers.save_model(net, tmp_path / "m.pt")
    loaded = helpers.load_model(tmp_path / "m.pt")
    result = helpers.test_model(loaded, data.test, device="cpu")
    out = capsys.readouterr().out
    assert "Accuracy of the network on the 20 test images" in out
    assert out.count("Accuracy for class:") == 10
    assert set(result["per_class"]) == set(helpers.CLASSES)


def test_train_or_load_reuses_and_protects(tmp_path, image_folder):
    root, _ = image_folder
    data = load_cifar10(root, cache_dir=tmp_path / "cache")
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu")
    path = tmp_path / "net.pt"
    m1, meta = train_or_load(data, path, cfg, progress=False)
    stamp = path.stat().st_mtime_ns
    m2, _ = train_or_load(data, path, cfg, progress=False)
    assert path.stat().st_mtime_ns == stamp
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m1(x), m2(x))
    assert meta["data_source"] == data.source and meta["recipe"]["epochs"] == 1
    with pytest.raises(helpers.CheckpointError, match="other settings"):
        train_or_load(data, path, TrainConfig(epochs=2, batch_size=8, device="cpu"), progress=False)
    assert path.stat().st_mtime_ns == stamp


def test_cli_train_end_to_end(tmp_path, image_folder, capsys):
    root, _ = image_folder
    out = tmp_path / "net.pt"
    summary = tmp_path / "train.json"
    rc = main(["train", "--data", str(root), "--data-root", str(tmp_path), "--epochs", "1",
               "--batch-size", "10", "--device", "cpu", "--out", str(out), "--json", str(summary)])
    assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "seconds per epoch" in printed
    assert json.loads(summary.read_text())["recipe"]["batch_size"] == 10


def test_cli_bad_source_exits_with_message(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing"), "--data-root", str(tmp_path), "--epochs", "1"])
    assert rc == 2
    assert "CIFAR-10 image folder not found" in capsys.readouterr().err
