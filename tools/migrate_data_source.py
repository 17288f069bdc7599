"""Rewrite path-keyed data sources in committed result files to the content-keyed form.

Results written before issue 11 name CIFAR-10 by absolute path (``"folder:/abs/path (JPEG copy)"``).
This loads the data the way the project does (``--data``, default auto), and replaces every such
string that :func:`~influence_over_inference.study.data.same_source` accepts with ``data.source``
(``"cifar10-folder:<sha12> (JPEG copy)"``), leaving numbers untouched. Usage, from the repository
root::

    python tools/migrate_data_source.py results/*.json bench/results/*.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from influence_over_inference.engine.io import write_text_atomic
from influence_over_inference.study.data import load_cifar10, same_source

LEGACY = re.compile(r'"(?:folder|torchvision):/[^"]*"')


def migrate(text: str, source: str) -> tuple[str, int]:
    """``text`` with each legacy source string matching ``source`` replaced, and how many were."""
    count = 0

    def swap(m: re.Match) -> str:
        nonlocal count
        old = json.loads(m.group(0))
        if not same_source(old, source + old[old.index(" [") :] if " [" in old else source):
            return m.group(0)
        count += 1
        return json.dumps(source + (old[old.index(" [") :] if " [" in old else ""))

    return LEGACY.sub(swap, text), count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--data", default="auto")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args(argv)
    data = load_cifar10(args.data, root=args.data_root)
    for name in args.files:
        path = Path(name)
        text, n = migrate(path.read_text(), data.source)
        if n:
            write_text_atomic(text, path)
        print(f"{path}: {n} data source(s) rewritten to {data.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
