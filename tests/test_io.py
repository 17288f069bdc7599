"""engine/io: atomic writers round-trip and leave no temporaries, a writer's process is told alive or gone
without being signalled, and an unwritable folder is named in a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from influence_over_inference.engine import io


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
        assert child.poll() is None  # only probed (signal 0), not hung up or killed
    finally:
        child.kill()
        child.wait()
    assert not io._pid_alive(child.pid)  # finished and reaped

    def not_ours(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io.os, "kill", not_ours)
    assert io._pid_alive(12345)  # another user's process: its files are left alone


def test_unwritable_folder_is_named_in_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(io.OutputNotWritableError) as error:
        io.check_writable_dir(tmp_path / "blocker" / "out")
    assert str(error.value) == f"cannot write folder {tmp_path / 'blocker' / 'out'}: {tmp_path / 'blocker'} is a file, not a folder"
    with pytest.raises(io.OutputNotWritableError, match=r"^cannot write cache folder "):
        io.check_writable_dir(tmp_path / "blocker", what="cache folder")
    assert io.check_writable_dir(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    assert (tmp_path / "new" / "deep").is_dir() and list((tmp_path / "new" / "deep").iterdir()) == []
