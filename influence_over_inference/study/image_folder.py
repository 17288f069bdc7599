"""Any torchvision-style image folder as training and test data for the engine.

A folder laid out as ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>`` (the
layout of ``torchvision.datasets.ImageFolder``, one folder per class, any class names, any image
size and format PIL reads). Labels follow the sorted class-folder names, as ImageFolder's do.
Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ...) are ignored. Without a ``test/``
folder the training images double as the test images (say which ones with their indices).

Images are decoded once, through the user's ``transform`` (a callable from a PIL image to a
tensor, e.g. a torchvision transform), and held in memory as float tensors (C, H, W); they must
all come out the same shape. The default transform is ``ToTensor()``, or this project's CIFAR-10
transform (``ToTensor`` then ``Normalize((0.5,)*3, (0.5,)*3)``) when the class folders are
exactly CIFAR-10's. Each split offers ``tensors(indices)``, ``labels``, ``names`` and ``classes``,
which is all the engine needs (see :mod:`..engine.params`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import CLASSES, IMAGE_SUFFIXES, DataSourceError, users_transform

log = logging.getLogger(__name__)

MAX_BYTES = 4 * 1024**3  # decoded images held in memory at most (float32)


class FolderSplit:
    """One split of an image folder, decoded: ``images`` float (N, C, H, W), ``labels`` (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str], classes: list[str]):
        if images.ndim != 4 or len(images) != len(labels) or len(names) != len(labels):
            raise ValueError("images (N, C, H, W), labels (N,) and names (N) must agree in length")
        self.images = images  # (N, C, H, W) float, as the transform made them
        self.labels = labels.long()  # (N,)
        self.names = names  # "<class>/<file>" relative to the split folder
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W) and labels (N,), for all or the given indices."""
        if indices is None:
            return self.images, self.labels.clone()
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]

    def select(self, indices) -> FolderSplit:
        """The images at ``indices`` (in that order) as a split of their own."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FolderSplit(self.images[idx], self.labels[idx], [self.names[i] for i in idx.tolist()], self.classes)


@dataclass
class FolderData:
    """The splits of an image folder, its class names and a description of where it came from."""

    train: FolderSplit
    test: FolderSplit
    classes: list[str]
    source: str  # "image-folder:<folder name>#<fingerprint of names and sizes>"; no machine path


def _visible(entries) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def list_classes(split_dir: Path) -> list[str]:
    """The class folders of one split (sorted, hidden folders ignored)."""
    if not split_dir.is_dir():
        raise DataSourceError(f"image folder not found: {split_dir} is not a folder")
    classes = [p.name for p in _visible(split_dir.iterdir()) if p.is_dir()]
    if not classes:
        raise DataSourceError(
            f"{split_dir} has no class folders; lay the images out as {split_dir}/<class>/<image> "
            "(one folder per class, as torchvision.datasets.ImageFolder expects)"
        )
    return classes


def list_files(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """``"<class>/<file>"`` names of the images of one split, in class then file order, and labels."""
    names, labels = [], []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue  # a test split may lack a class
        files = [p.name for p in _visible(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        names += [f"{cls}/{f}" for f in files]
        labels += [label] * len(files)
    if not names:
        raise DataSourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}/<class>/")
    return names, labels


def default_transform(classes: list[str]) -> Callable:
    """This project's CIFAR-10 transform for CIFAR-10's class folders; ``ToTensor()`` otherwise."""
    if list(classes) == list(CLASSES):
        return users_transform()
    from torchvision import transforms

    return transforms.ToTensor()


def _decode(split_dir: Path, names: list[str], transform: Callable, progress: bool) -> torch.Tensor:
    from PIL import Image
    from tqdm.auto import tqdm

    out = None
    for i, name in enumerate(tqdm(names, desc=f"decoding {split_dir.name}", unit="img", leave=False, disable=not progress)):
        path = split_dir / name
        try:
            with Image.open(path) as im:
                x = transform(im.convert("RGB"))
        except Exception as error:
            raise DataSourceError(f"could not read image {split_dir.name}/{name}: {error}; remove or replace the file") from error
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise DataSourceError(f"the transform must turn an image into a tensor (C, H, W); it gave {type(x).__name__} "
                                  f"{tuple(getattr(x, 'shape', ()))} for {name}")
        if out is None:
            need = len(names) * x.numel() * 4
            if need > MAX_BYTES:
                raise DataSourceError(f"{len(names)} images of shape {tuple(x.shape)} need {need / 1e9:.1f} GB in memory "
                                      f"(limit {MAX_BYTES / 1e9:.1f} GB); resize them in the transform or use a subset")
            out = torch.empty(len(names), *x.shape, dtype=torch.float32)
        elif x.shape != out.shape[1:]:
            raise DataSourceError(f"{name} comes out {tuple(x.shape)} but the first image {tuple(out.shape[1:])}: "
                                  "images must share one size; add a Resize to the transform")
        out[i] = x
    return out


def fingerprint(folder: Path, listing: dict[str, list[str]]) -> str:
    """A short hash of the relative file names and their sizes: the folder's identity, not its path."""
    h = hashlib.sha256()
    for split, names in listing.items():
        h.update(f"{split}:{len(names)}\n".encode())
        for name in names:
            h.update(f"{name}:{os.path.getsize(folder / split / name)}\n".encode())
    return h.hexdigest()[:12]


def load_image_folder(root: str | os.PathLike, transform: Callable | None = None, progress: bool = True) -> FolderData:
    """The training (``root/train``) and test (``root/test``, else the training) images of a folder.

    ``transform``: PIL image -> tensor (C, H, W) (default: :func:`default_transform`). Raises
    :class:`~.data.DataSourceError` saying what is wrong and how to lay the folder out.
    """
    root = Path(root)
    if not (root / "train").is_dir():
        raise DataSourceError(
            f"{root} has no train/ folder; lay the images out as {root}/train/<class>/<image> "
            f"(and optionally {root}/test/<class>/<image>)"
        )
    classes = list_classes(root / "train")
    transform = transform or default_transform(classes)
    listing, labels = {}, {}
    listing["train"], labels["train"] = list_files(root / "train", classes)
    has_test = (root / "test").is_dir()
    if has_test:
        unknown = sorted(set(list_classes(root / "test")) - set(classes))
        if unknown:
            raise DataSourceError(f"{root}/test has class folders that train/ lacks: {unknown}")
        listing["test"], labels["test"] = list_files(root / "test", classes)
    splits = {s: FolderSplit(_decode(root / s, listing[s], transform, progress), torch.tensor(labels[s]), listing[s], classes)
              for s in listing}
    if not has_test:
        log.warning("%s has no test/ folder: the training images serve as the test images", root.name)
        splits["test"] = splits["train"]
    source = f"image-folder:{root.name}#{fingerprint(root, listing)}"
    return FolderData(splits["train"], splits["test"], classes, source)


def is_cifar_folder(root: str | os.PathLike) -> bool:
    """True when ``root/train`` holds exactly CIFAR-10's ten class folders (the study's loader reads it)."""
    train = Path(root) / "train"
    return train.is_dir() and [p.name for p in _visible(train.iterdir()) if p.is_dir()] == list(CLASSES)
