"""Running influence_over_inference.ipynb headless (papermill) and checking what it produced.

``run_notebook`` executes the notebook top to bottom with optional parameters (papermill's
``parameters`` cell convention), without progress-bar noise or warnings in the saved outputs, and
writes the result atomically: an interrupted run never leaves a half-written notebook.
``check_outputs`` says whether it ran: no cell raised, every cell tagged ``figure`` holds a PNG,
and every influence table has ``k`` rows.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ..engine.io import atomic_write

NOTEBOOK = Path(__file__).resolve().parents[2] / "influence_over_inference.ipynb"


TABLE_ROW = re.compile(r"^\s*(helpful|harmful)\s+\d+\s+\d+\s")  # one row of an influence table


def run_notebook(
    path: str | os.PathLike = NOTEBOOK,
    output: str | os.PathLike | None = None,
    parameters: dict | None = None,
    timeout_s: int = 3600,
    cwd: str | os.PathLike | None = None,
) -> tuple[Path, float]:
    """Execute ``path`` and write it to ``output`` (default: in place). Returns (output, seconds)."""
    import nbformat
    import papermill

    path = Path(path)
    output = Path(output) if output else path
    tmp = output.with_name(f".{output.stem}.running{os.getpid()}.ipynb")
    env_before = {k: os.environ.get(k) for k in ("TQDM_DISABLE", "PYTHONWARNINGS", "MPLBACKEND")}
    os.environ.update(TQDM_DISABLE="1", PYTHONWARNINGS="ignore", MPLBACKEND="module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path), str(tmp), parameters=parameters or {}, kernel_name="python3",
            cwd=str(cwd or path.parent), progress_bar=False, execution_timeout=timeout_s, log_output=False,
        )
        seconds = time.perf_counter() - start
        nb = nbformat.read(tmp, as_version=4)
        clean(nb)
        atomic_write(output, lambda out_tmp: nbformat.write(nb, out_tmp))
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if tmp.exists():
            tmp.unlink()
    return output, seconds


def clean(nb) -> None:
    """Drop stderr streams (progress bars, warnings) and per-run timing metadata from outputs."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        pm = cell.metadata.get("papermill")
        if pm is not None:
            cell.metadata["papermill"] = {k: v for k, v in pm.items() if k not in ("start_time", "end_time", "duration", "status")}
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not _noise(o)]
    pm = nb.metadata.get("papermill")
    if pm is not None:
        kept = {k: v for k, v in pm.items() if k == "parameters"}
        if pm.get("input_path"):  # the file name only: no machine path (or temporary name) in a committed notebook
            kept["input_path"] = Path(pm["input_path"]).name
        nb.metadata["papermill"] = kept


def _noise(output) -> bool:
    """stderr (progress bars, warnings) and progress widgets: nothing a reader of the notebook needs."""
    if output.get("output_type") == "stream" and output.get("name") == "stderr":
        return True
    return "application/vnd.jupyter.widget-view+json" in output.get("data", {})


def check_outputs(path: str | os.PathLike, k: int, n_test_images: int) -> list[str]:
    """Problems with an executed notebook (empty list: it ran and produced what it should)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    problems = []
    rows = {"helpful": 0, "harmful": 0}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        if any(o.get("output_type") == "error" for o in outputs):
            problems.append(f"cell {i} raised an error")
        if cell.get("execution_count") is None and cell.source.strip():
            problems.append(f"cell {i} did not run")
        if "figure" in cell.metadata.get("tags", []):
            if not any("image/png" in o.get("data", {}) for o in outputs):
                problems.append(f"figure cell {i} produced no PNG")
        for o in outputs:
            text = o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", "")
            for line in text.splitlines():
                m = TABLE_ROW.match(line)
                if m:
                    rows[m.group(1)] += 1
    for kind, count in rows.items():
        if count != k * n_test_images:
            problems.append(f"{count} {kind} table rows, expected k={k} x {n_test_images} test images")
    return problems
