"""The notebook runs top to bottom, headless, in quick mode, and produces its figures and tables."""

import nbformat
import pytest

from influence_over_inference.report.notebook import NOTEBOOK, check_outputs, run_notebook
from influence_over_inference.study.data import DataSourceError, load_cifar10


def _cifar_available() -> bool:
    try:
        load_cifar10()
    except DataSourceError:
        return False
    return True


def test_committed_notebook_has_no_defs_and_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    for c in code:
        assert "def " not in c.source and "class " not in c.source
        assert len(c.source.splitlines()) <= 12, c.source


def test_committed_notebook_holds_a_full_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert NOTEBOOK.stat().st_size < 5_000_000
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "QUICK = False" in params.source
    assert check_outputs(NOTEBOOK, k=5, n_test_images=3) == []
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "50,000 training" in text and "JPEG copy" in text



@pytest.mark.skipif(not _cifar_available(), reason="CIFAR-10 not available (no internet and no CIFAR10_DIR)")
def test_notebook_runs_in_quick_mode(tmp_path):
    out, _ = run_notebook(
        NOTEBOOK, tmp_path / "quick.ipynb",
        parameters={"QUICK": True, "CHECKPOINT": str(tmp_path / "net.pt"), "RESULTS": None,
                    "CACHE_DIR": str(tmp_path / "influence")},
        timeout_s=600,
    )
    assert check_outputs(out, k=5, n_test_images=2) == []
