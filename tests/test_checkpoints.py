"""The checkpoint loader, message by message (issue 15, found by mutation testing): what is saved,
what a plain ``state_dict`` of another size loads as, each unreadable form's one-line reason, the
GPU-saved checkpoint on a CPU machine, and the pickle guard even when the environment relaxes
torch's default (tiny nets, milliseconds)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from conftest import PicklePayload
from torch import nn

import influence_over_inference.study.checkpoints as checkpoints
from influence_over_inference.study.checkpoints import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from influence_over_inference.study.model import Net

SMALL = dict(n_classes=7, channels=(2, 3), hidden=(4, 5))


def _small():
    torch.manual_seed(0)
    return Net(**SMALL)


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kw)
    return str(info.value)


def test_saved_blob_holds_format_version_architecture_config_and_metadata(tmp_path):
    path = save_checkpoint(_small(), tmp_path / "m.pt", {"test_accuracy": 0.5})
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == FORMAT and blob["version"] == VERSION == 1 and blob["architecture"] == "Net"
    assert blob["config"] == _small().config and blob["metadata"] == {"test_accuracy": 0.5}
    assert torch.load(save_checkpoint(_small(), tmp_path / "n.pt"), weights_only=True)["metadata"] == {}
    plain = torch.load(save_checkpoint(nn.Linear(2, 2), tmp_path / "linear.pt"), weights_only=True)
    assert plain["config"] == {} and plain["architecture"] == "Linear"  # a model without a config


def test_refusing_to_overwrite_says_how_to(tmp_path):
    path = save_checkpoint(_small(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_small(), path)
    assert str(info.value) == (f"{path} already exists; pass overwrite=True (command line: --overwrite) to replace it, "
                               "or choose another path")


def test_round_trip_keeps_weights_and_metadata_and_goes_to_the_device(tmp_path):
    net = _small()
    path = save_checkpoint(net, tmp_path / "m.pt", {"recipe": {"weight_decay": 5e-4}})
    loaded, meta = load_checkpoint(path)
    assert meta == {"recipe": {"weight_decay": 5e-4}} and not loaded.training
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    on_meta, _ = load_checkpoint(path, device="meta")
    assert all(p.device.type == "meta" for p in on_meta.parameters())


def test_project_checkpoint_without_config_or_metadata_loads_the_default_net(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "bare.pt"
    torch.save({"format": FORMAT, "version": VERSION, "architecture": "Net", "state_dict": Net().state_dict()}, path)
    model, meta = load_checkpoint(path)
    assert meta == {} and sum(p.numel() for p in model.parameters()) == 62006


def test_plain_state_dict_of_another_size_loads_with_its_shape(tmp_path):
    net = _small()
    path = tmp_path / "plain.pth"
    torch.save(net.state_dict(), path)
    model, meta = load_checkpoint(path)
    assert meta == {"note": "plain state_dict"}
    assert model.config == net.config
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), net.eval()(x))


def test_legacy_pickle_format_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_small().state_dict(), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    model, _ = load_checkpoint(path)
    assert model.config == _small().config


def test_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: a CUDA-tagged checkpoint loads either way")
    real = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    path = save_checkpoint(_small(), tmp_path / "gpu.pt")
    monkeypatch.setattr(torch.serialization, "location_tag", real)
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True)  # what loading without map_location does here
    model, _ = load_checkpoint(path)
    assert next(model.parameters()).device.type == "cpu"


def test_pickle_payload_is_refused_even_when_the_environment_relaxes_torchs_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # makes weights_only default to False
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "architecture": "Net", "config": SMALL, "state_dict": _small().state_dict(),
                "metadata": {"x": PicklePayload(marker)}}, path)
    text = _error(path)
    assert "holds pickled Python objects" in text and "save model.state_dict() instead" in text
    assert not marker.exists(), "loading the checkpoint ran code from its pickle"


def test_each_unreadable_form_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert _error(tmp_path / "empty.pt") == f"{tmp_path / 'empty.pt'} is empty (0 bytes): an interrupted copy? Copy or train it again"
    (tmp_path / "one.pt").write_bytes(b"\x80")  # one byte of a legacy (pickle) file: cut off, not empty
    assert _error(tmp_path / "one.pt") == f"{tmp_path / 'one.pt'} {TRUNCATED}"
    assert _error(tmp_path / "none.pt").startswith(f"no checkpoint at {tmp_path / 'none.pt'}; train one")
    (tmp_path / "text.pt").write_text("hello")
    assert _error(tmp_path / "text.pt") == (f"{tmp_path / 'text.pt'} is not a PyTorch file (text or another format); "
                                            "give the .pt file torch.save wrote")
    torch.save([1, 2], tmp_path / "list.pt")
    assert _error(tmp_path / "list.pt") == f"{tmp_path / 'list.pt'} is a PyTorch file but not a model checkpoint (found list)"
    torch.save({"format": FORMAT, "architecture": "ResNet", "state_dict": {}}, tmp_path / "resnet.pt")
    assert _error(tmp_path / "resnet.pt") == f"{tmp_path / 'resnet.pt'} holds a 'ResNet' model; this project loads 'Net'"


def test_wrong_weights_list_missing_unexpected_and_mismatched_tensors(tmp_path):
    state = Net().state_dict()
    state.pop("fc3.bias")
    state["extra.weight"] = torch.zeros(1)
    state["fc1.weight"] = torch.zeros(3, 400)
    state["fc2.weight"] = torch.zeros(84, 3)
    path = tmp_path / "wrong.pt"
    torch.save({"format": FORMAT, "architecture": "Net", "config": {}, "state_dict": state}, path)
    assert _error(path) == (f"{path} does not hold the nimarb CNN (Net): missing ['fc3.bias'], unexpected ['extra.weight'], "
                            "shape mismatch fc1.weight: expected (120, 400), found (3, 400); "
                            "fc2.weight: expected (84, 120), found (84, 3)")
    only_missing = Net().state_dict()
    only_missing.pop("conv1.bias")
    torch.save({"format": FORMAT, "architecture": "Net", "state_dict": only_missing}, path)
    assert _error(path) == f"{path} does not hold the nimarb CNN (Net): missing ['conv1.bias']"
    only_extra = {**Net().state_dict(), "extra": torch.zeros(1)}
    torch.save({"format": FORMAT, "architecture": "Net", "state_dict": only_extra}, path)
    assert _error(path) == f"{path} does not hold the nimarb CNN (Net): unexpected ['extra']"
    torch.save({"encoder.weight": torch.zeros(3)}, path)  # a plain state_dict of something else
    assert "does not hold the nimarb CNN (Net): missing ['conv1.bias'" in _error(path)


PICKLED = ("holds pickled Python objects (e.g. a whole model saved with torch.save(model)), which are not loaded "
           "because unpickling can run code; save model.state_dict() instead and load that")
TRUNCATED = "is truncated (the file ends early): an interrupted copy or save? Copy or train it again"
NOT_TORCH = "is not a PyTorch file (text or another format); give the .pt file torch.save wrote"


@pytest.mark.parametrize("error,want", [
    (pickle.UnpicklingError("Weights only load failed. Unsupported global"), PICKLED),
    (RuntimeError("set weights_only=False to load it"), PICKLED),
    (EOFError("Ran out of input"), TRUNCATED),
    (RuntimeError("unexpected EOF, expected more"), TRUNCATED),
    (RuntimeError("failed finding central directory"), TRUNCATED),
    (RuntimeError("File Truncated at byte 8"), TRUNCATED),
    (pickle.UnpicklingError("invalid load key, 'h'."), NOT_TORCH),
    (RuntimeError("Not A Zip File"), NOT_TORCH),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte"), NOT_TORCH),
    (RuntimeError("\x1b[31mboom\x1b[0m  at\nline 2"), "is not a readable PyTorch checkpoint (RuntimeError: boom at line 2)"),
    (ValueError(""), "is not a readable PyTorch checkpoint (ValueError: no detail)"),
])
def test_why_unreadable_gives_one_readable_reason(error, want):
    assert checkpoints._why_unreadable(error) == want


def test_why_unreadable_cuts_a_long_message_at_300_characters():
    text = checkpoints._why_unreadable(OSError("x" * 400))
    assert re.fullmatch(r"is not a readable PyTorch checkpoint \(OSError: x{300}\)", text)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_cut_off_anywhere_is_reported_as_truncated(tmp_path, legacy):
    """An interrupted copy: a prefix of a real checkpoint (zip from its 2-byte magic on, or the legacy pickle
    format) says truncated."""
    from influence_over_inference.study.model import Net

    torch.manual_seed(0)
    path = tmp_path / "full.pt"
    torch.save(Net(channels=(2, 2), hidden=(8, 8)).state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    lengths = [2, 3, 4, 10, 100, len(data) // 2, len(data) - 1] if not legacy else [1, 2, 3, 10, len(data) - 1]
    for n in lengths:
        cut.write_bytes(data[:n])
        assert _error(cut) == f"{cut} {TRUNCATED}", n
