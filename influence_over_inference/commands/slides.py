"""``python -m influence_over_inference slides``: build ``presentation.pdf``."""

from __future__ import annotations

from ..engine.io import check_writable
from ..report.slide_inputs import SlidesConfig
from ..report.slides import build_slides

# Command line


def register(subparsers) -> None:
    defaults = SlidesConfig()
    p = subparsers.add_parser("slides", help="build presentation.pdf from the cached results")
    p.add_argument("--out", default=defaults.out, help=f"PDF to write (default: {defaults.out})")
    p.add_argument("--results-dir", default=defaults.results_dir,
                   help=f"folder with train.json, influence.json, validation.json (default: {defaults.results_dir})")
    p.add_argument("--engine-json", default=defaults.engine_json,
                   help=f"benchmark summary (default: {defaults.engine_json})")
    p.add_argument("--data", default=defaults.data, help="CIFAR-10 source for the images (default: auto)")
    p.add_argument("--data-root", default=defaults.data_root, help="torchvision root and cache folder")
    p.add_argument("--max-test-images", type=int, default=defaults.max_test_images,
                   help=f"influence slides, one per test image (default: {defaults.max_test_images})")
    p.add_argument("--k", type=int, default=defaults.k,
                   help=f"helpful and harmful images per test image (default: {defaults.k})")
    p.set_defaults(func=_cmd_slides)


def _cmd_slides(args) -> int:
    check_writable(args.out, "--out")
    config = SlidesConfig(out=args.out, results_dir=args.results_dir, engine_json=args.engine_json,
                          data=args.data, data_root=args.data_root,
                          max_test_images=args.max_test_images, k=args.k)
    path, titles, problems = build_slides(config)
    lines = [f"{path}: {len(titles)} slides"] + [f"  {i:2d}. {t}" for i, t in enumerate(titles, 1)]
    lines += [f"layout problem: {p}" for p in problems]
    print("\n".join(lines))  # noqa: T201 (CLI output)
    return 0
