"""Running influence_over_inference.ipynb headless (papermill) and checking what it produced.

``run_notebook`` executes the notebook top to bottom with optional parameters (papermill's
``parameters`` cell convention), without progress-bar noise or warnings in the saved outputs, and
writes the result atomically: an interrupted run never leaves a half-written notebook.
``check_outputs`` says whether it ran: no cell raised, every cell tagged ``figure`` holds a PNG,
and every influence table has ``k`` rows.

What is saved is portable (:func:`clean`): no progress widgets or their state, no papermill
paths, no per-run timings, and no absolute path of this machine in any output (each is cut to
``…/<last part>``; :func:`absolute_paths` finds any that are left). Quick runs
(:data:`QUICK_OUTPUT`) go under ``data/``, never over the committed notebook.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ..engine.io import atomic_write

NOTEBOOK = Path(__file__).resolve().parents[2] / "influence_over_inference.ipynb"
QUICK_OUTPUT = Path("data") / "notebook" / "influence_over_inference.quick.ipynb"  # relative to the working directory

# An absolute POSIX path ("/work/x/y", "folder:/home/me/data") or a home path ("~/data/x"): "/"
# or "~/" not preceded by a word character, "." or another "/" (so "1/2", "data/cache" and the
# "//" of "https://..." are left alone), then at least one "name/" and a last part.
ABSOLUTE_PATH = re.compile(r"(?<![\w/.~-])(?:~/|/)(?:[\w.@+-]+/)+[\w.@+-]*")


TABLE_ROW = re.compile(r"^\s*(helpful|harmful)\s+\d+\s+\d+\s")  # one row of an influence table


def run_notebook(
    path: str | os.PathLike = NOTEBOOK,
    output: str | os.PathLike | None = None,
    parameters: dict | None = None,
    timeout_s: int = 3600,
    cwd: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[Path, float]:
    """Execute ``path`` and write it to ``output`` (default: in place). Returns (output, seconds).

    ``progress``: a tqdm bar over the cells (cell number and its first line), on stderr; the
    progress bars inside the cells stay off either way.
    """
    import nbformat
    import papermill

    path = Path(path)
    output = Path(output) if output else path
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.running{os.getpid()}.ipynb")
    env_before = {k: os.environ.get(k) for k in ("TQDM_DISABLE", "PYTHONWARNINGS", "MPLBACKEND")}
    os.environ.update(TQDM_DISABLE="1", PYTHONWARNINGS="ignore", MPLBACKEND="module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path), str(tmp), parameters=parameters or {}, kernel_name="python3",
            cwd=str(cwd or path.parent), progress_bar={"disable": not progress, "desc": "notebook cells"},
            execution_timeout=timeout_s, log_output=False,
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
    """Make an executed notebook portable and quiet, in place.

    Drops stderr streams (progress bars, warnings), progress widgets and their saved state
    (``metadata.widgets``), per-run timings, and papermill's ``input_path`` / ``output_path``
    (absolute paths of the machine that ran it; the ``parameters`` stay); cuts every absolute
    path left in a text output to ``…/<last part>`` (:func:`scrub_paths`).
    """
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        pm = cell.metadata.get("papermill")
        if pm is not None:
            cell.metadata["papermill"] = {k: v for k, v in pm.items() if k not in ("start_time", "end_time", "duration", "status")}
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not _noise(o)]
            for o in cell.outputs:
                _scrub_output(o)
    nb.metadata.pop("widgets", None)
    pm = nb.metadata.get("papermill")
    if pm is not None:
        params = pm.get("parameters") or {}
        kept = {"parameters": {k: scrub_paths(v) if isinstance(v, str) else v for k, v in params.items()}}
        nb.metadata["papermill"] = kept


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path cut to ``…/<its last part>``:
    ``"folder:/work/data/cifar10 (JPEG copy)"`` -> ``"folder:…/cifar10 (JPEG copy)"``."""
    return ABSOLUTE_PATH.sub(lambda m: "…/" + (m.group(0).rstrip("/").rsplit("/", 1)[-1] or "…"), text)


def absolute_paths(nb) -> list[str]:
    """Every absolute path in the notebook's outputs and metadata (empty list: portable)."""
    import json

    found = ABSOLUTE_PATH.findall(json.dumps(nb.metadata))
    for cell in nb.cells:
        found += ABSOLUTE_PATH.findall(json.dumps(cell.metadata))
        for o in cell.get("outputs", []):
            texts = [o.get("text", "")] + [v for k, v in o.get("data", {}).items() if k.startswith("text/")]
            for t in texts:
                found += ABSOLUTE_PATH.findall(t if isinstance(t, str) else "".join(t))
    return found


def _scrub_output(output) -> None:
    if "text" in output:
        output["text"] = scrub_paths(_joined(output["text"]))
    for key, value in output.get("data", {}).items():
        if key.startswith("text/"):
            output["data"][key] = scrub_paths(_joined(value))
    if output.get("output_type") == "error":
        output["traceback"] = [scrub_paths(line) for line in output.get("traceback", [])]
        output["evalue"] = scrub_paths(output.get("evalue", ""))


def _joined(text) -> str:
    return text if isinstance(text, str) else "".join(text)


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
