"""CIFAR-10, from torchvision's download or from an image folder, as cached uint8 tensors.

Two sources give the same thing: 50,000 training and 10,000 test images with CIFAR-10's labels
(airplane=0 ... truck=9) and the users' transform, ToTensor() then Normalize((0.5,)*3, (0.5,)*3).

- ``torchvision``: ``torchvision.datasets.CIFAR10(root, download=True)``, the original dataset;
  the default wherever the internet is reachable.
- an image folder laid out as ``train/<class>/*`` and ``test/<class>/*`` (for machines without
  internet; here ``../shared/data/cifar10``, a JPEG copy of CIFAR-10). Files are read in a fixed
  order (class in CIFAR-10's label order, then file name), so training-image index ``i`` names
  the same image on every machine. Decoded images are cached under ``data/cache/``, keyed by
  the files' relative names, sizes and modification times (an edited image is decoded again).

A source is identified by its kind and a fingerprint of its content, never by its path:
``data.source`` is ``"cifar10-folder:<sha12>"`` (plus ``" (JPEG copy)"``) or
``"cifar10-torchvision:<sha12>"``, the first 12 hex digits of a SHA-256 over every decoded pixel
and label (:func:`content_fingerprint`). Checkpoints, caches and results record it, so a moved or
re-cloned checkout with the same data reuses them. ``data.label`` says where the images came from,
for display (relative to the working folder where possible). Records written before this, which
name the source by absolute path (``"folder:/abs/path"``), still match through
:func:`same_source`, with a note in the log.

Influence results name training images by index into :attr:`CIFAR10Data.train`, which is never
augmented and never shuffled (the "eval view"); augmentation, if any, lives in the training loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..engine.io import atomic_torch_save

log = logging.getLogger(__name__)

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


MEAN = (0.5, 0.5, 0.5)


STD = (0.5, 0.5, 0.5)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


ENV_VAR = "CIFAR10_DIR"


# Where this project's offline machines keep the JPEG copy, relative to the repository root.
OFFLINE_FALLBACK = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


CACHE_VERSION = 2


MANUAL_PLACEMENT_HELP = (
    "To use CIFAR-10 without internet, either (a) copy the Python version of the original "
    "(cifar-10-python.tar.gz, unpacked as <root>/cifar-10-batches-py/) into the data root, or "
    "(b) lay the images out as <dir>/train/<class>/*.png and <dir>/test/<class>/*.png with the "
    f"ten class folders {', '.join(CLASSES)}, and pass source=<dir> (command line: "
    f"--data <dir>) or set {ENV_VAR}=<dir>."
)


class DataSourceError(RuntimeError):
    """CIFAR-10 could not be found or read; the message says what was looked for and what to do."""


def users_transform():
    """The users' torchvision transform: ``ToTensor()`` then ``Normalize((0.5,)*3, (0.5,)*3)``."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """The users' transform, vectorised: uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W) in [0, 1], as ToTensor
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`normalize_uint8` for display: float (..., 3, H, W) -> float in [0, 1]."""
    mean = torch.tensor(MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


class CIFAR10Split(Dataset):
    """One split as uint8 images in memory; items are ``(normalised image, label)``.

    ``images`` is uint8 (N, 32, 32, 3), ``labels`` int64 (N,), ``names`` the file of each image
    relative to the source (``"<class>/<file>"``) or ``"cifar10[<i>]"`` for torchvision's copy.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images) or len(names) != len(images):
            raise ValueError("images, labels and names must have the same length")
        self.images = images
        self.labels = labels.long()
        self.names = names
        self.classes = CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return normalize_uint8(self.images[index : index + 1])[0], int(self.labels[index])

    def tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (N, 3, 32, 32) and labels (N,), for all or the given indices."""
        if indices is None:
            return normalize_uint8(self.images), self.labels.clone()
        idx = torch.as_tensor(indices, dtype=torch.long)
        return normalize_uint8(self.images[idx]), self.labels[idx]

    def select(self, indices) -> CIFAR10Split:
        """The images at ``indices`` (in that order) as a split of their own."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return CIFAR10Split(self.images[idx], self.labels[idx], [self.names[i] for i in idx.tolist()])

    def balanced(self, n: int | None) -> CIFAR10Split:
        """A class-balanced ``n`` images (all if ``n`` is None), in index order: see :func:`balanced_indices`."""
        if n is None or n >= len(self):
            return self
        return self.select(balanced_indices(self.labels, n))

    def subset(self, n: int | None) -> CIFAR10Split:
        """The first ``n`` images (all if ``n`` is None), same order, same indices.

        The image-folder order is sorted by class, so a prefix is not class-balanced: use
        :func:`balanced_subset` for a small training set.
        """
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        counts = torch.bincount(self.labels[:n], minlength=len(CLASSES))
        if counts.min() * len(CLASSES) < n // 2:
            log.warning("the first %d images are not class-balanced (%d of %d classes present); "
                        "use balanced(n) for a balanced subset", n, int((counts > 0).sum()), len(CLASSES))
        return CIFAR10Split(self.images[:n], self.labels[:n], self.names[:n])


@dataclass
class CIFAR10Data:
    """Both splits and where they came from. ``train`` is the eval view: fixed order, no augmentation."""

    train: CIFAR10Split
    test: CIFAR10Split
    source: str  # kind and content fingerprint, e.g. "cifar10-folder:3f2a9c0d1e4b (JPEG copy)"
    label: str = ""  # where the images came from, for display: "../shared/data/cifar10 (JPEG copy)"

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES


def balanced_indices(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` indices spread evenly over the classes (the first of each class, round-robin), sorted."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    by_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    picked, depth = [], 0
    while len(picked) < min(n, len(labels)):
        for members in by_class:
            if depth < len(members) and len(picked) < n:
                picked.append(int(members[depth]))
        depth += 1
    return torch.tensor(sorted(picked), dtype=torch.long)


def balanced_subset(data: CIFAR10Data, n: int | None) -> CIFAR10Data:
    """``data`` with a class-balanced training subset of ``n`` images (None: unchanged).

    Takes the first ``n // 10`` images of each class, in the split's order. (``subset(n)`` takes
    the first ``n``, which in the class-sorted image-folder order are all airplanes.) Training
    indices then count positions in the subset; ``names`` still identify the files. The source
    string records the subset, so results and checkpoints made on it never pass for full-set ones.
    """
    if n is None or n >= len(data.train):
        return data
    per_class = n // len(CLASSES)
    if per_class < 1:
        raise ValueError(f"a balanced subset needs at least {len(CLASSES)} images, got {n}")
    keep = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:per_class] for c in range(len(CLASSES))])
    train = CIFAR10Split(data.train.images[keep], data.train.labels[keep], [data.train.names[i] for i in keep.tolist()])
    return CIFAR10Data(train, data.test, source=f"{data.source} [balanced subset: {per_class} per class]",
                       label=f"{data.label} [balanced subset: {per_class} per class]")


def resolve_source(source: str | os.PathLike | None = None, root: str | os.PathLike = "data") -> tuple[str, Path]:
    """Decide where CIFAR-10 comes from: ``("torchvision", root)`` or ``("folder", dir)``.

    ``source`` may be ``"torchvision"``, a folder path, or None/``"auto"``. Auto picks, in order:
    the ``CIFAR10_DIR`` environment variable; torchvision's copy if already downloaded under
    ``root``; the offline JPEG copy beside this repository (``../shared/data/cifar10``) if the
    internet is unreachable; otherwise torchvision's download.
    """
    root = Path(root)
    if source not in (None, "auto"):
        if str(source) == "torchvision":
            return "torchvision", root
        return "folder", Path(source).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return "folder", Path(env).expanduser().resolve()
    if (root / "cifar-10-batches-py").is_dir():
        return "torchvision", root
    if OFFLINE_FALLBACK.is_dir() and not _internet_reachable():
        return "folder", OFFLINE_FALLBACK
    return "torchvision", root


def _internet_reachable(host: str = "www.cs.toronto.edu", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_cifar10(
    source: str | os.PathLike | None = None,
    root: str | os.PathLike = "data",
    cache_dir: str | os.PathLike | None = None,
) -> CIFAR10Data:
    """Load CIFAR-10 train and test splits (see the module docstring for ``source``).

    ``root`` is where torchvision downloads to; folder sources are decoded once and cached
    in ``cache_dir`` (default ``<root>/cache``), so later loads take well under a second.
    """
    kind, where = resolve_source(source, root)
    if kind == "torchvision":
        return _load_torchvision(where)
    return _load_folder(where, Path(cache_dir) if cache_dir else Path(root) / "cache")


def _load_torchvision(root: Path) -> CIFAR10Data:
    from torchvision.datasets import CIFAR10

    try:
        splits = [CIFAR10(root=str(root), train=train, download=True) for train in (True, False)]
    except Exception as error:  # URLError, socket errors, corrupt archives
        raise DataSourceError(
            f"Could not download or read CIFAR-10 with torchvision into {root.resolve()}: {error}. "
            + MANUAL_PLACEMENT_HELP
        ) from error
    out = []
    for ds in splits:
        images = torch.from_numpy(np.ascontiguousarray(ds.data))  # (N, 32, 32, 3) uint8
        labels = torch.tensor(ds.targets, dtype=torch.long)
        out.append(CIFAR10Split(images, labels, [f"cifar10[{i}]" for i in range(len(labels))]))
    fp = content_fingerprint(out[0], out[1])
    return CIFAR10Data(out[0], out[1], source=f"cifar10-torchvision:{fp}", label=f"torchvision CIFAR-10 in {display_path(root)}")


def list_image_folder(split_dir: Path) -> tuple[list[str], list[int]]:
    """Files of one split as ``"<class>/<file>"`` in the fixed order, with their labels.

    Raises :class:`DataSourceError` if the folder, a class folder or its images are missing.
    """
    if not split_dir.is_dir():
        raise DataSourceError(f"CIFAR-10 image folder not found: {split_dir} does not exist. " + MANUAL_PLACEMENT_HELP)
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [c for c in CLASSES if c not in found]
    extra = [c for c in found if c not in CLASSES]
    if missing or extra:
        raise DataSourceError(
            f"{split_dir} must hold exactly the ten CIFAR-10 class folders; "
            f"missing: {missing or 'none'}, unexpected: {extra or 'none'}. " + MANUAL_PLACEMENT_HELP
        )
    names, labels = [], []
    for label, cls in enumerate(CLASSES):
        files = sorted(f.name for f in (split_dir / cls).iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        if not files:
            raise DataSourceError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {split_dir / cls}. " + MANUAL_PLACEMENT_HELP)
        names += [f"{cls}/{f}" for f in files]
        labels += [label] * len(files)
    return names, labels


def _decode(split_dir: Path, names: list[str]) -> torch.Tensor:
    from PIL import Image
    from tqdm.auto import tqdm

    images = np.empty((len(names), 32, 32, 3), dtype=np.uint8)
    for i, name in enumerate(tqdm(names, desc=f"decoding {split_dir.name}", unit="img", leave=False)):
        path = split_dir / name
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as error:
            raise DataSourceError(f"Could not read image {path}: {error}. Remove or replace the file.") from error
        if arr.shape != (32, 32, 3):
            raise DataSourceError(f"{path} is {arr.shape[1]}x{arr.shape[0]}; CIFAR-10 images are 32x32 RGB.")
        images[i] = arr
    return torch.from_numpy(images)


def content_fingerprint(train: CIFAR10Split, test: CIFAR10Split) -> str:
    """12 hex digits of a SHA-256 over both splits' decoded pixels and labels: the data's identity.

    Independent of paths, file names and timestamps; ~0.5 s for CIFAR-10 (stored in the cache).
    """
    h = hashlib.sha256(b"cifar10-content-v1")
    for split in (train, test):
        h.update(f"|{len(split)}|".encode())
        h.update(memoryview(split.images.contiguous().numpy()).cast("B"))
        h.update(memoryview(split.labels.to(torch.int64).contiguous().numpy()).cast("B"))
    return h.hexdigest()[:12]


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when that is short (``../shared/...``), else its name."""
    path = Path(path).resolve()
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path.name
    return rel if rel.count("..") <= 1 else path.name


def same_source(recorded: str | None, current: str) -> bool:
    """Whether a recorded ``data_source`` names the data loaded now (``current``).

    Equal strings match. A record of the older, path-keyed form (``"folder:/abs/path (JPEG
    copy)"``, ``"torchvision:/abs/root"``) matches a source of the same kind, JPEG-ness and subset,
    with a note in the log: the path cannot be checked against the content.
    """
    if not recorded:
        return False
    if recorded == current:
        return True
    kind, _, rest = recorded.partition(":")
    legacy = {"folder": "cifar10-folder", "torchvision": "cifar10-torchvision"}.get(kind)
    if legacy is None or not current.startswith(legacy + ":"):
        return False
    subset = lambda s: s[s.index(" [") :] if " [" in s else ""  # noqa: E731
    if ("JPEG copy" in recorded) != ("JPEG copy" in current) or subset(rest) != subset(current):
        return False
    log.warning("the record names its data by path (%s, an older format); taking it to be %s", recorded, current)
    return True


def _cache_key(folder: Path, listing: dict[str, list[str]]) -> str:
    """Relative names, sizes and modification times of every file: any edit changes the key."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for split, names in listing.items():
        h.update(f"|{split}:{len(names)}".encode())
        for name in names:
            st = os.stat(folder / split / name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_cache(cache: Path, key: str, listing: dict[str, list[str]]) -> tuple[dict, str] | None:
    """The cached splits and fingerprint if ``cache`` is readable and stores ``key``; else None."""
    if not cache.exists():
        return None
    try:
        blob = torch.load(cache, weights_only=True)
        if blob.get("key") != key:
            raise ValueError(f"it stores key {blob.get('key')!r}, not {key!r}")
        splits = {s: CIFAR10Split(blob[f"{s}_images"], blob[f"{s}_labels"], listing[s]) for s in listing}
        log.info("loaded decoded CIFAR-10 from cache %s", cache.name)
        return splits, blob["fingerprint"]
    except Exception as error:  # a damaged or foreign cache is rebuilt, never trusted
        log.warning("ignoring cache %s (%s); decoding again", cache.name, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None


def _load_folder(folder: Path, cache_dir: Path) -> CIFAR10Data:
    if not folder.is_dir():
        raise DataSourceError(f"CIFAR-10 image folder not found: {folder}. " + MANUAL_PLACEMENT_HELP)
    listing, labels = {}, {}
    for split in ("train", "test"):
        listing[split], labels[split] = list_image_folder(folder / split)
    key = _cache_key(folder, listing)
    cache = cache_dir / f"cifar10-folder-{key}.pt"
    found = _read_cache(cache, key, listing)
    if found is None:
        splits = {
            s: CIFAR10Split(_decode(folder / s, listing[s]), torch.tensor(labels[s]), listing[s])
            for s in listing
        }
        fp = content_fingerprint(splits["train"], splits["test"])
        blob = {f"{s}_{k}": getattr(splits[s], k) for s in splits for k in ("images", "labels")}
        atomic_torch_save({**blob, "key": key, "fingerprint": fp}, cache)
    else:
        splits, fp = found
    jpeg = " (JPEG copy)" if any(n.lower().endswith((".jpg", ".jpeg")) for n in listing["train"][:10]) else ""
    return CIFAR10Data(splits["train"], splits["test"], source=f"cifar10-folder:{fp}{jpeg}",
                       label=f"{display_path(folder)}{jpeg}")
