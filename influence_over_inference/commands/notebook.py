"""``python -m influence_over_inference notebook``: run the notebook headless."""

from __future__ import annotations

from ..engine.io import check_writable
from ..report.notebook import NOTEBOOK, QUICK_OUTPUT, run_notebook


def register(subparsers) -> None:
    p = subparsers.add_parser("notebook", help="run influence_over_inference.ipynb headless and save it with its outputs")
    p.add_argument("--output", default=None,
                   help=f"where to write the executed notebook (default: in place; with --quick: {QUICK_OUTPUT})")
    p.add_argument("--quick", action="store_true",
                   help=f"quick mode: 2,000 training images, 1 epoch, 2 test images, written to {QUICK_OUTPUT}")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter of the notebook's parameters cell (Python literal), e.g. -p DEVICE='\"cpu\"'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the cells")
    p.set_defaults(func=_cmd_notebook)


def _cmd_notebook(args) -> int:
    import ast

    params = {"QUICK": True} if args.quick else {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value
    output = args.output or (QUICK_OUTPUT if args.quick else None)
    check_writable(output or NOTEBOOK, "notebook output")
    out, seconds = run_notebook(NOTEBOOK, output, params, progress=not args.no_progress)
    print(f"executed {out} in {seconds / 60:.1f} min ({out.stat().st_size / 1e6:.2f} MB)")  # noqa: T201 (CLI output)
    return 0
