import os

import pytest
import torch
from torch import nn

from influence_over_inference.engine.hashing import file_sha256
from influence_over_inference.study.checkpoints import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from influence_over_inference.study.data import CIFAR10Split
from influence_over_inference.study.model import N_PARAMETERS, Net, count_parameters
from influence_over_inference.study.training import TrainConfig, evaluate, resolve_device, train


def tiny_split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return CIFAR10Split(images, labels, [f"x{i}" for i in range(n)])


def test_parameter_count_and_layers():
    net = Net()
    assert count_parameters(net) == N_PARAMETERS == 62_006
    assert [tuple(p.shape) for p in net.parameters()] == [
        (6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 10
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = nn.functional.cross_entropy(net(x), y)
    before.backward()
    opt.step()
    after = nn.functional.cross_entropy(net(x), y)
    assert after.item() < before.item()


def test_training_is_seeded_and_deterministic_on_cpu():
    split = tiny_split()
    cfg = TrainConfig(epochs=2, batch_size=8, seed=3, device="cpu")
    a = train(split, cfg, progress=False)
    b = train(split, cfg, progress=False)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert len(a.history) == 2 and a.history[1].loss < a.history[0].loss * 1.5


def test_training_lowers_the_loss_and_reports_epochs():
    split = tiny_split(32)
    seen = []
    res = train(split, TrainConfig(epochs=6, batch_size=8, lr=0.02, device="cpu"), progress=False, on_epoch_end=seen.append)
    assert [s.epoch for s in seen] == list(range(1, 7))
    assert res.history[-1].loss < res.history[0].loss
    ev = evaluate(res.model, split, device="cpu")
    assert set(ev["per_class"]) <= set(split.classes) and 0 <= ev["accuracy"] <= 1


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(lr=0), dict(momentum=1.0), dict(weight_decay=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")


def test_save_load_identical_outputs(tmp_path):
    net = Net().eval()
    path = save_checkpoint(net, tmp_path / "m.pt", {"test_accuracy": 0.5})
    loaded, meta = load_checkpoint(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(net(x), loaded(x))
    assert meta["test_accuracy"] == 0.5 and not loaded.training


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(Net(), path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(Net(), path)
    assert path.read_bytes() == before
    save_checkpoint(Net(), path, overwrite=True)
    assert path.read_bytes() != before


def test_interrupted_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(Net(), path)
    before = path.read_bytes()

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Net(), path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_plain_state_dict_loads(tmp_path):
    net = Net()
    torch.save(net.state_dict(), tmp_path / "cifar_net.pth")
    loaded, _ = load_checkpoint(tmp_path / "cifar_net.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net.eval()(x), loaded(x))


def _check_untouched_error(path, match):
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before


def test_mismatched_architecture_raises_clear_error(tmp_path):
    other = Net(hidden=(64, 32))
    path = save_checkpoint(other, tmp_path / "other.pt")
    # the recorded config builds the smaller net fine; a state_dict of another shape must not load
    blob = torch.load(path, weights_only=True)
    blob["config"] = Net().config
    torch.save(blob, path)
    _check_untouched_error(path, r"shape mismatch fc1.weight: expected \(120, 400\), found \(64, 400\)")
    lin = tmp_path / "linear.pt"
    torch.save(nn.Linear(3, 2).state_dict(), lin)
    _check_untouched_error(lin, "does not hold the nimarb CNN")


def test_truncated_checkpoint_raises_clear_error(tmp_path):
    path = save_checkpoint(Net(), tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:1000])
    _check_untouched_error(path, "is truncated")


def test_foreign_file_raises_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am not a checkpoint")
    _check_untouched_error(path, "is not a PyTorch file")
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    _check_untouched_error(other, "not a model checkpoint")


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="python -m influence_over_inference train"):
        load_checkpoint(tmp_path / "none.pt")


def test_file_hash_changes_with_content(tmp_path):
    a = save_checkpoint(Net(), tmp_path / "a.pt")
    torch.manual_seed(1)
    b = save_checkpoint(Net(), tmp_path / "b.pt")
    assert file_sha256(a) != file_sha256(b) and len(file_sha256(a)) == 16
