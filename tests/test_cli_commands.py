"""The ``validate``, ``slides`` and ``notebook`` commands run end to end through the command line
(``cli.main([...])``) on tiny inputs made in the test: what each prints and writes (issue 15;
seconds each)."""

from __future__ import annotations

import json

import nbformat
import pytest
import torch
from conftest import make_image_folder
from pypdf import PdfReader

from influence_over_inference.cli import main
from influence_over_inference.study.checkpoints import save_checkpoint
from influence_over_inference.study.model import Net

TINY_RETRAIN = '{"steps": 3, "batch_size": 8}'
TINY_FAST = '{"rank": 10, "n_samples": 5, "chunk_size": 10}'


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "cifar"
    make_image_folder(root, n_train_per_class=3, n_test_per_class=1)
    return root


def _validate(tmp_path, folder, *args):
    out, arrays = tmp_path / "results" / "validation.json", tmp_path / "results" / "arrays.npz"
    rc = main(["validate", *args, "--data", str(folder), "--data-root", str(tmp_path), "--cache-dir",
               str(tmp_path / "cache"), "--out", str(out), "--arrays", str(arrays), "--no-progress"])
    return rc, out, arrays


def test_validate_loo_convex_writes_the_summary_and_prints_the_correlations(tmp_path, folder, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(Net(channels=(2, 2), hidden=(6, 5)), tmp_path / "net.pt", {"recipe": {"weight_decay": 0.01}})
    rc, out, arrays = _validate(tmp_path, folder, "loo-convex", "--checkpoint", str(ckpt),
                                "--set", "test_indices=[0, 3]", "--set", "top_k=4")
    assert rc == 0
    text = capsys.readouterr().out
    assert "loo-convex (" in text and "n_train 30" in text
    assert text.count("Pearson") == 2 and "test image 3: Pearson" in text and f"summary: {out}" in text
    summary = json.loads(out.read_text())
    assert len(summary["loo_convex_pearson"]) == 2 and all(-1 <= p <= 1 for p in summary["loo_convex_pearson"])
    assert arrays.is_file()
    again = tmp_path / "again.json"
    assert main(["validate", "loo-convex", "--checkpoint", str(ckpt), "--set", "test_indices=[0, 3]", "--set",
                 "top_k=4", "--data", str(folder), "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(again), "--arrays", str(arrays), "--no-progress"]) == 0
    assert json.loads(again.read_text())["loo_convex_pearson"] == summary["loo_convex_pearson"]  # cached, same


def test_validate_sign_runs_tiny_and_reports_both_directions(tmp_path, folder, capsys):
    rc, out, _ = _validate(tmp_path, folder, "sign", "--set", "n_test=1", "--set", "n_remove=2", "--set",
                           "n_per_class=3", "--set", "train_epochs=1", "--set", f"retrain={TINY_RETRAIN}",
                           "--set", f"solver_settings={TINY_FAST}")
    assert rc == 0
    text = capsys.readouterr().out
    assert "remove 100 most harmful" in text and "remove 100 most helpful" in text
    summary = json.loads(out.read_text())
    assert summary["sign_n_test"] == 1
    assert isinstance(summary["sign_harmful_removed_delta"], float) and isinstance(summary["sign_helpful_removed_delta"], float)


def test_validate_rejects_bad_settings_with_a_message(tmp_path, folder, capsys):
    assert _validate(tmp_path, folder, "all", "--set", "top_k=4")[0] == 2
    assert "--set applies to a single experiment" in capsys.readouterr().err
    assert _validate(tmp_path, folder, "sign", "--set", "n_test")[0] == 2
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert _validate(tmp_path, folder, "sign", "--set", "n_test=0")[0] == 2
    assert "n_test and n_remove must be >= 1" in capsys.readouterr().err


def test_slides_command_builds_a_deck_saying_what_is_not_computed(tmp_path, folder, capsys):
    out = tmp_path / "deck" / "slides.pdf"
    results = tmp_path / "results"
    results.mkdir()
    rc = main(["slides", "--out", str(out), "--results-dir", str(results), "--engine-json", str(tmp_path / "none.json"),
               "--data", str(folder), "--data-root", str(tmp_path)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    n = int(lines[0].split(": ")[1].split()[0])
    assert lines[0] == f"{out}: {n} slides" and n == len(PdfReader(out).pages) and n >= 5
    assert [line.split(".", 1)[0].strip() for line in lines[1 : n + 1]] == [str(i) for i in range(1, n + 1)]
    text = " ".join(page.extract_text() for page in PdfReader(out).pages)
    assert "not computed" in text and "validate" in text
    assert main(["slides", "--out", str(out), "--k", "9"]) == 2  # more than fit on a slide: a message, no traceback
    assert "k must be between 1 and 8" in capsys.readouterr().err


TINY_NOTEBOOK = [("QUICK = False\nNAME = 'x'\nDEVICE = 'auto'", ["parameters"]),
                 ("print(f'quick={QUICK} name={NAME} device={DEVICE}')", [])]


def test_notebook_command_runs_a_notebook_with_its_parameters(tmp_path, monkeypatch, capsys):
    import influence_over_inference.commands.notebook as command

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for source, tags in TINY_NOTEBOOK:
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setattr(command, "NOTEBOOK", path)
    monkeypatch.chdir(tmp_path)
    assert main(["notebook", "--quick", "-p", "DEVICE=\"cpu\"", "-p", "NAME=plain words", "--no-progress"]) == 0
    out = tmp_path / command.QUICK_OUTPUT
    assert f"executed {command.QUICK_OUTPUT} in" in capsys.readouterr().out
    ran = nbformat.read(out, as_version=4)
    printed = "".join(o.get("text", "") for c in ran.cells if c.cell_type == "code" for o in c.outputs)
    assert printed == "quick=True name=plain words device=cpu\n"
    assert nbformat.read(path, as_version=4).cells[-1].outputs == []  # the source notebook is left as it was
