"""Misuse a new user could make, and what they see: moved checkouts, concurrent writers, edited images,
misplaced cache entries, unwritable outputs, bad arguments and bad checkpoints (issue 11)."""

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from influence_over_inference.cli import main
from influence_over_inference.engine import io
from influence_over_inference.engine.influence_engine import InfluenceEngine
from influence_over_inference.engine.io import (
    OutputNotWritableError,
    check_writable,
    remove_stale_temporaries,
    save_npz_atomic,
    write_json_atomic,
)
from influence_over_inference.engine.solvers.registry import make_solver
from influence_over_inference.study import data as data_mod
from influence_over_inference.study import training
from influence_over_inference.study.checkpoints import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from influence_over_inference.study.data import load_cifar10, same_source
from influence_over_inference.study.model import Net

TRAIN_ARGS = ["--epochs", "1", "--batch-size", "10", "--device", "cpu"]


def _tiny_checkpoint(path, metadata=None):
    torch.manual_seed(0)
    return save_checkpoint(Net(channels=(2, 2), hidden=(8, 8)), path, metadata or {"recipe": {"weight_decay": 5e-4}})


# 1. Identity by content, not by path


def test_moved_checkout_with_copied_data_reuses_checkpoint_and_decoded_cache(tmp_path, monkeypatch, capsys):
    first = tmp_path / "clone-a"
    make_image_folder(first / "cifar")
    monkeypatch.chdir(first)
    assert main(["train", "--data", "cifar", *TRAIN_ARGS]) == 0
    checkpoint = Path("data/cifar_net.pt")
    recorded = torch.load(checkpoint, weights_only=True)["metadata"]["data_source"]
    assert recorded.startswith("cifar10-folder:") and str(tmp_path) not in recorded

    moved = tmp_path / "elsewhere" / "clone-b"
    shutil.copytree(first, moved)  # checkout, data folder, checkpoint and cache, with their timestamps
    shutil.rmtree(first)
    monkeypatch.chdir(moved)
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained again in the moved checkout"))
    monkeypatch.setattr(data_mod, "_decode", lambda *a, **k: pytest.fail("decoded again in the moved checkout"))
    capsys.readouterr()
    assert main(["train", "--data", "cifar", *TRAIN_ARGS]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_source_is_the_same_for_a_copy_of_the_data_and_differs_for_other_pixels(tmp_path):
    make_image_folder(tmp_path / "a", seed=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    make_image_folder(tmp_path / "c", seed=2)
    a, b, c = (load_cifar10(tmp_path / n, cache_dir=tmp_path / "cache").source for n in "abc")
    assert a == b != c
    assert str(tmp_path) not in a


def test_old_path_keyed_checkpoint_still_loads_with_a_note(tmp_path, image_folder, caplog):
    root, _ = image_folder
    data = load_cifar10(root, cache_dir=tmp_path / "cache")
    config = training.TrainConfig(epochs=1, batch_size=10, device="cpu")
    path = tmp_path / "old.pt"
    _, meta = training.train_or_load(data, path, config, progress=False)
    blob = torch.load(path, weights_only=True)
    blob["metadata"]["data_source"] = "folder:/some/other/machine/cifar10"  # as written before issue 11
    torch.save(blob, path)
    with caplog.at_level(logging.WARNING):
        _, again = training.train_or_load(data, path, config, progress=False)
    assert again["test_accuracy"] == meta["test_accuracy"]
    assert "older format" in caplog.text
    assert not same_source("folder:/x (JPEG copy)", data.source)  # a JPEG copy is other data than PNGs
    assert not same_source("torchvision:/x", data.source)


# 2. The decoded-image cache follows the files


def test_edited_image_after_caching_is_decoded_again(image_folder, tmp_path):
    root, _ = image_folder
    before = load_cifar10(root, cache_dir=tmp_path / "cache")
    target = root / "train" / "cat" / "0001.png"
    new = np.full((32, 32, 3), 123, dtype=np.uint8)
    Image.fromarray(new).save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    after = load_cifar10(root, cache_dir=tmp_path / "cache")
    i = after.train.names.index("cat/0001.png")
    assert np.array_equal(after.train.images[i].numpy(), new)
    assert after.source != before.source


def test_cache_entry_under_the_wrong_key_is_rejected(tmp_path):
    make_image_folder(tmp_path / "a", seed=1)
    make_image_folder(tmp_path / "b", seed=2)
    cache = tmp_path / "cache"
    a = load_cifar10(tmp_path / "a", cache_dir=cache)
    entry_a = set(cache.glob("*.pt"))
    b = load_cifar10(tmp_path / "b", cache_dir=cache)
    (entry_b,) = set(cache.glob("*.pt")) - entry_a
    shutil.copy(next(iter(entry_a)), entry_b)  # b's file now holds a's images
    again = load_cifar10(tmp_path / "b", cache_dir=cache)
    assert torch.equal(again.train.images, b.train.images) and not torch.equal(again.train.images, a.train.images)


def test_engine_cache_entry_under_the_wrong_key_is_recomputed(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 10
    ckpt = _tiny_checkpoint(tmp_path / "net.pt")
    model, _ = load_checkpoint(ckpt)

    def engine():
        return InfluenceEngine(model, (x, y), make_solver("exact", damping=0.1), weight_decay=0.0,
                               cache_dir=tmp_path / "influence", checkpoint=ckpt, data_source="t", progress=False)

    right_0 = engine().scores(x[:1], y[:1])
    right_1 = engine().scores(x[1:3], y[1:3])
    e = engine()
    shutil.copy(e.cache_path("scores", e._test_key(x[:1], y[:1])), e.cache_path("scores", e._test_key(x[1:3], y[1:3])))
    assert torch.equal(engine().scores(x[1:3], y[1:3]), right_1)
    assert not torch.equal(right_0, right_1[:1])


# 3. Writes: atomic, concurrent, checked early


def _writer(path: str, seed: int) -> None:
    for i in range(15):
        write_json_atomic({"writer": seed, "i": i, "pad": list(range(2000))}, path)
        save_npz_atomic(Path(path).with_suffix(".npz"), a=np.full(1000, seed))


def test_concurrent_writers_to_one_output_never_fail_or_leave_temporaries(tmp_path):
    out = tmp_path / "rep.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(out), s)) for s in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert json.loads(out.read_text())["i"] == 14
    assert np.load(out.with_suffix(".npz"))["a"].shape == (1000,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.json", "rep.npz"]


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".rep.tmp-{dead.pid}-0123abcd.json"
    stale.write_text("{half")
    mine = tmp_path / f".rep.tmp-{os.getpid()}-0123abcd.json"  # a live writer's: kept
    mine.write_text("{")
    write_json_atomic({"ok": 1}, tmp_path / "rep.json")
    assert not stale.exists() and mine.exists()
    assert remove_stale_temporaries(tmp_path) == []


def test_unwritable_output_is_one_line_error_before_any_work(tmp_path, image_folder, monkeypatch, capsys):
    root, _ = image_folder
    ckpt = _tiny_checkpoint(tmp_path / "net.pt")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    from influence_over_inference.commands import influence as cmd

    monkeypatch.setattr(cmd, "_load_data", lambda args: pytest.fail("loaded data before checking the outputs"))
    for flag, value in (("--out", blocker / "rep"), ("--cache-dir", blocker / "cache")):
        rc = main(["influence", "--data", str(root), "--checkpoint", str(ckpt), flag, str(value)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: cannot write") and err.count("\n") == 1, err
    with pytest.raises(OutputNotWritableError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(OutputNotWritableError, match="a-file is a file, not a folder"):
        check_writable(blocker / "deeper" / "rep.json")


def test_train_checks_its_outputs_before_loading_data(tmp_path, image_folder, monkeypatch, capsys):
    root, _ = image_folder
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(data_mod, "_load_folder", lambda *a: pytest.fail("loaded data before checking the outputs"))
    rc = main(["train", "--data", str(root), *TRAIN_ARGS, "--out", str(tmp_path / "a-file" / "net.pt")])
    assert rc == 2 and "cannot write checkpoint" in capsys.readouterr().err


# 4. Arguments validated before work; balanced subsets; weight decay


@pytest.mark.parametrize("bad, message", [
    (["--k", "0"], "--k must be >= 1"),
    (["--k", "-3"], "--k must be >= 1"),
    (["--n-train", "0"], "--n-train must be >= 1"),
    (["--test-index", "-1"], "--test-index must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--solver", "cg", "--damping", "-1"], "damping"),
])
def test_bad_arguments_fail_before_loading_anything(tmp_path, image_folder, monkeypatch, capsys, bad, message):
    root, _ = image_folder
    ckpt = _tiny_checkpoint(tmp_path / "net.pt")
    from influence_over_inference.commands import influence as cmd

    monkeypatch.setattr(cmd, "_load_data", lambda args: pytest.fail("loaded data before validating the arguments"))
    rc = main(["influence", "--data", str(root), "--checkpoint", str(ckpt), "--out", str(tmp_path / "r"), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_under_torchrun_bad_arguments_fail_before_the_process_group_forms(tmp_path, image_folder, monkeypatch, capsys):
    """Every rank checks its arguments first: a typo must not wait for (or hang) a gloo rendezvous."""
    root, _ = image_folder
    ckpt = _tiny_checkpoint(tmp_path / "net.pt")
    from influence_over_inference.engine import distributed

    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group before checking"))
    for bad in (["--k", "0"], ["--solver", "fast", "--rank", "0"]):
        rc = main(["influence", "--data", str(root), "--checkpoint", str(ckpt), "--out", str(tmp_path / "r"), *bad])
        assert rc == 2 and capsys.readouterr().err.startswith("error:")


def test_n_train_is_class_balanced_in_the_cli_and_in_training(tmp_path, image_folder, capsys):
    root, _ = image_folder
    ckpt = _tiny_checkpoint(tmp_path / "net.pt")
    assert main(["influence", "--data", str(root), "--checkpoint", str(ckpt), "--n-train", "10", "--k", "10",
                 "--solver", "exact", "--no-cache", "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_train"] == 10
    assert len({e["class"] for e in report["tests"][0]["helpful"]}) == 10  # not ten airplanes
    data = load_cifar10(root, cache_dir=tmp_path / "cache")
    assert data.train.balanced(20).labels.bincount().tolist() == [2] * 10


def test_unknown_weight_decay_warns_and_the_flag_sets_it(tmp_path, image_folder, caplog, capsys):
    root, _ = image_folder
    torch.manual_seed(0)
    torch.save(Net(channels=(2, 2), hidden=(8, 8)).state_dict(), tmp_path / "plain.pt")  # the tutorial's format
    common = ["influence", "--data", str(root), "--checkpoint", str(tmp_path / "plain.pt"), "--solver", "exact",
              "--no-cache", "--k", "2", "--n-train", "20", "--out", str(tmp_path / "r")]
    with caplog.at_level(logging.WARNING):
        assert main(common) == 0
    assert "does not record its training weight decay" in caplog.text
    assert json.loads((tmp_path / "r.json").read_text())["weight_decay"] == 0.0
    assert main([*common, "--weight-decay", "5e-4"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["weight_decay"] == 5e-4


# 5. Readable errors; hidden folders ignored


def test_every_bad_checkpoint_form_gives_a_readable_one_line_error(tmp_path):
    good = _tiny_checkpoint(tmp_path / "good.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save(Net(), tmp_path / "whole.pt")
    expected = {"empty": "is empty", "text": "not a PyTorch file", "truncated": "truncated",
                "foreign": "does not hold the nimarb CNN", "whole": "save model.state_dict() instead"}
    for name, words in expected.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / f"{name}.pt")
        text = str(err.value)
        assert words in text and "\n" not in text and "\x1b" not in text and not text.endswith(": "), (name, text)


def test_hidden_folders_in_an_image_folder_are_ignored(image_folder, tmp_path):
    root, _ = image_folder
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "cat" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "train" / "cat" / ".hidden.png")
    d = load_cifar10(root, cache_dir=tmp_path / "cache")
    assert len(d.train) == 30


# No machine path in committed files


def test_executed_notebook_keeps_no_machine_path():
    import nbformat

    from influence_over_inference.report.notebook import clean

    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"QUICK": True}, "input_path": "/home/me/repo/nb.ipynb",
                                "output_path": "/home/me/repo/.nb.running123.ipynb", "start_time": "x"}
    clean(nb)
    assert nb.metadata["papermill"] == {"parameters": {"QUICK": True}}  # no machine path, no temporary name


def test_migration_rewrites_old_sources_and_nothing_else():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from migrate_data_source import migrate

    text = json.dumps({"data_source": "folder:/abs/cifar10 (JPEG copy)", "acc": 0.5,
                       "other": "torchvision:/abs/root", "sub": "folder:/abs/cifar10 (JPEG copy) [balanced subset: 2 per class]"})
    new, n = migrate(text, "cifar10-folder:0123456789ab (JPEG copy)")
    out = json.loads(new)
    assert n == 2 and out["acc"] == 0.5 and out["other"] == "torchvision:/abs/root"
    assert out["data_source"] == "cifar10-folder:0123456789ab (JPEG copy)"
    assert out["sub"] == "cifar10-folder:0123456789ab (JPEG copy) [balanced subset: 2 per class]"


def test_committed_files_hold_no_absolute_machine_path():
    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files", "results", "bench/results", "README.md"], cwd=root,
                           capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    offenders = [f for f in files if f.endswith((".json", ".md")) and any(
        p in (root / f).read_text(errors="ignore") for p in ('"/work/', '"/home/', '"/tmp/', ":/work/", ":/home/"))]
    assert offenders == []


def test_asking_for_a_prefix_warns_that_it_is_not_balanced(image_folder, tmp_path, caplog):
    root, _ = image_folder
    d = load_cifar10(root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        d.train.subset(10)
    assert "not class-balanced" in caplog.text


# Atomic writers, whose process is alive, and unwritable folders (engine/io; issue 15)

def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_atomic_writers_round_trip_and_leave_no_temporaries(tmp_path):
    assert io.write_text_atomic("héllo\n", tmp_path / "a.txt") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_text() == "héllo\n"
    assert io.write_text_atomic("", tmp_path / "a.txt").read_text() == ""  # overwritten, even with nothing
    io.write_json_atomic({"x": [1, 2]}, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    io.save_npz_atomic(tmp_path / "c.npz", a=np.arange(3), b=np.eye(2))
    with np.load(tmp_path / "c.npz") as z:
        assert z["a"].tolist() == [0, 1, 2] and z["b"].tolist() == [[1, 0], [0, 1]]
    io.atomic_torch_save({"t": torch.ones(2)}, tmp_path / "sub" / "d.pt")  # missing folders are made
    assert torch.equal(torch.load(tmp_path / "sub" / "d.pt", weights_only=True)["t"], torch.ones(2))
    assert _no_temporaries(tmp_path) and _no_temporaries(tmp_path / "sub")


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = io.write_text_atomic("old", tmp_path / "a.txt")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and _no_temporaries(tmp_path)


def test_pid_alive_without_signalling_the_process(monkeypatch):
    assert io._pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert io._pid_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # only probed (signal 0), not hung up or killed
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert not io._pid_alive(child.pid)  # finished and reaped

    def not_ours(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io.os, "kill", not_ours)
    assert io._pid_alive(12345)  # another user's process: its files are left alone
    sent = []
    monkeypatch.setattr(io.os, "kill", lambda pid, sig: sent.append(sig))
    assert io._pid_alive(12345) and sent == [0]  # signal 0 probes; any other would act (SIGHUP may be ignored here)


def test_unwritable_folder_is_named_in_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(io.OutputNotWritableError) as error:
        io.check_writable_dir(tmp_path / "blocker" / "out")
    assert str(error.value) == f"cannot write folder {tmp_path / 'blocker' / 'out'}: {tmp_path / 'blocker'} is a file, not a folder"
    with pytest.raises(io.OutputNotWritableError, match=r"^cannot write cache folder "):
        io.check_writable_dir(tmp_path / "blocker", what="cache folder")
    assert io.check_writable_dir(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    assert (tmp_path / "new" / "deep").is_dir() and list((tmp_path / "new" / "deep").iterdir()) == []


def test_stale_temporaries_are_returned_and_logged_by_count_and_folder(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".rep.tmp-{dead.pid}-0123abcd.json", tmp_path / f".cache.tmp-{dead.pid}-89abcdef.pt"]
    for p in stale:
        p.write_text("half")
    (tmp_path / "rep.json").write_text("{}")  # not a temporary: kept
    with caplog.at_level("INFO", logger="influence_over_inference.engine.io"):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale) and (tmp_path / "rep.json").exists()
    assert [r.getMessage() for r in caplog.records] == [f"removed 2 stale temporary file(s) of killed runs in {tmp_path.name}"]


def test_writers_name_their_temporaries_for_the_cleanup_and_write_json_with_indent_one(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    io.write_json_atomic({"a": [1, {"b": 2}]}, tmp_path / "r.json")
    assert len(seen) == 1 and io._TMP.match(seen[0]) and seen[0].endswith(".json")  # what remove_stale_temporaries finds
    assert (tmp_path / "r.json").read_text() == json.dumps({"a": [1, {"b": 2}]}, indent=1)


def test_check_writable_names_the_output_and_why(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("")
    with pytest.raises(io.OutputNotWritableError) as error:
        io.check_writable(tmp_path / "blocker" / "r.json")
    assert str(error.value) == f"cannot write output {tmp_path / 'blocker' / 'r.json'}: {tmp_path / 'blocker'} is a file, not a folder"
    (tmp_path / "r.json").write_text("{}")
    monkeypatch.setattr(io.os, "access", lambda path, mode: False)  # as root every file is writable: pretend
    with pytest.raises(io.OutputNotWritableError, match=r"^cannot write summary .*r\.json: the file is read-only$"):
        io.check_writable(tmp_path / "r.json", what="summary")
    monkeypatch.undo()

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(io.OutputNotWritableError) as error:
        io.check_writable(tmp_path / "out" / "r.json")
    assert str(error.value) == f"cannot write output {tmp_path / 'out' / 'r.json'}: No space left on device"

