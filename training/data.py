"""Data sources: one `Dataset` in memory from an image folder, a Decathlon devkit, IDX or `.npz`.

A data spec is `PATH[:SPLIT]`. `load_data` detects the kind of `PATH`:

- an image folder with one sub-folder per class (jpg, png, bmp, webp, gif); if `PATH` holds
  `train/`, `val/`, `test/` folders, SPLIT picks one (default train);
- the Visual Decathlon devkit (`annotations/<domain>_<split>.json`, COCO style, images under
  `data/`); labels are offset per domain in the devkit and made 0-based here; needs `domain`;
- MNIST / Fashion-MNIST IDX files (`train-*` / `t10k-*`, gzipped or not); SPLIT train or test;
- a `.npz` with `x` (N, H, W[, C] uint8), `y` (N,) ints and optional `labels`.

Images are decoded once (in a thread pool) into uint8 `side` x `side` squares (shorter side
resized, center crop; see `model.preprocessing`); training crops them at random, evaluation at the
center. Unreadable images are skipped and counted, never silently.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import json
import logging
import os
import pathlib
import struct

import numpy as np
from PIL import Image

from model.preprocessing import ImageDecodeError, open_image, square, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}
SPLITS = ("train", "val", "test")
_log = logging.getLogger(__name__)


class DataError(ValueError):
    """Data that cannot be trained or evaluated on, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 (N, side, side, 3)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    kind: str
    grayscale: bool = False  # every source image was single-channel
    skipped: tuple[str, ...] = ()  # unreadable files, with the reason

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise DataError(f"The {self.kind} data has no images.")
        if len(self.class_names) < 2:
            raise DataError(f"The {self.kind} data has {len(self.class_names)} class; a classifier needs at least 2.")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DataError(
                f"Labels must lie in [0, {len(self.class_names) - 1}]; found {self.labels.min()}..{self.labels.max()}."
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        text = f"{self.kind}: {len(self.images)} images, {self.num_classes} classes"
        if self.skipped:
            text += f", {len(self.skipped)} unreadable skipped (first: {self.skipped[0]})"
        return text

    def subset(self, index: np.ndarray) -> Dataset:
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index], skipped=())

    def split(self, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """A stratified (train, val) split with `fraction` of each class in val."""
        rng = np.random.default_rng(seed)
        val = []
        for c in range(self.num_classes):
            members = rng.permutation(np.flatnonzero(self.labels == c))
            val.extend(members[: max(1, round(len(members) * fraction))] if len(members) > 1 else [])
        mask = np.zeros(len(self.labels), bool)
        mask[val] = True
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images in [0, 1] (the training set's own normalisation)."""
        x = self.images.reshape(-1, 3).astype(np.float64) / 255.0
        return tuple(x.mean(0).round(6).tolist()), tuple(np.maximum(x.std(0), 1e-3).round(6).tolist())


def parse_spec(spec: str) -> tuple[pathlib.Path, str | None]:
    path, _, split = str(spec).partition(":")
    if split and split not in SPLITS:
        raise DataError(f"Unknown split {split!r} in {spec!r}; use one of {SPLITS}.")
    return pathlib.Path(path), split or None


def load_data(spec: str, side: int, domain: str | None = None, grayscale: bool = False) -> Dataset:
    """Load the data named by `PATH[:SPLIT]` as `side` x `side` uint8 squares.

    `grayscale` converts every image to gray first, as the service does for a grayscale domain.
    """
    path, split = parse_spec(spec)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    if path.suffix == ".npz":
        return _load_npz(path, side, grayscale)
    if path.is_dir() and (path / "annotations").is_dir():
        return _load_devkit(path, split or "train", domain, side, grayscale)
    if path.is_dir() and _idx_file(path, "train", "images", required=False):
        return _load_idx(path, split or "train", side)
    if path.is_dir():
        if split or ((path / "train").is_dir() and any((path / s).is_dir() for s in ("val", "test"))):
            path = path / (split or "train")
            if not path.is_dir():
                raise DataError(f"{path} does not exist.")
        return _load_folder(path, side, grayscale)
    raise DataError(
        f"Cannot tell what {path} holds: give an image folder, a Decathlon devkit root, an IDX folder or a .npz."
    )


def _squares(images: list[Image.Image], side: int, grayscale: bool = False) -> np.ndarray:
    if not images:
        return np.zeros((0, side, side, 3), np.uint8)
    return np.stack([square(to_rgb(im, grayscale), side) for im in images])


def _decode_files(
    files: list[pathlib.Path], side: int, grayscale: bool
) -> tuple[list[np.ndarray | None], list[str], bool]:
    """Decode in a thread pool; returns squares (None where unreadable), skip reasons, all-gray flag."""

    def decode(file: pathlib.Path) -> tuple[np.ndarray | None, str | None, bool]:
        try:
            image = open_image(file, min_side=side)  # as serving decodes it
            gray = image.mode in ("L", "LA", "I", "I;16", "F", "1")
            return square(to_rgb(image, grayscale), side), None, gray
        except ImageDecodeError as exc:
            return None, f"{file}: {exc}", False

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(decode, files))
    skipped = [reason for _, reason, _ in results if reason]
    for reason in skipped:
        _log.warning("skipped unreadable image %s", reason)
    readable = [gray for square_, _, gray in results if square_ is not None]
    return [r[0] for r in results], skipped, bool(readable) and all(readable)


def _load_folder(path: pathlib.Path, side: int, grayscale: bool) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path} has no class sub-folders; put each class's images in a folder named after it.")
    files, labels = [], []
    for i, name in enumerate(classes):
        members = sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise DataError(f"The class folder {path / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        files += members
        labels += [i] * len(members)
    squares, skipped, gray = _decode_files(files, side, grayscale)
    keep = [i for i, s in enumerate(squares) if s is not None]
    images = np.stack([squares[i] for i in keep]) if keep else np.zeros((0, side, side, 3), np.uint8)
    kept_labels = np.asarray(labels, np.int64)[keep]
    empty = [name for i, name in enumerate(classes) if not np.any(kept_labels == i)]
    if empty and keep:
        raise DataError(f"These classes have no readable images: {empty}. Add images or remove the folders.")
    return Dataset(images, kept_labels, tuple(classes), "image-folder", gray, tuple(skipped))


def _load_npz(path: pathlib.Path, side: int, grayscale: bool) -> Dataset:
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data.files or "y" not in data.files:
            raise DataError(f"{path} must hold arrays 'x' (N, H, W[, C] uint8) and 'y' (N,); it has {data.files}.")
        x, y = data["x"], data["y"]
        names = [str(s) for s in data["labels"]] if "labels" in data.files else None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
        raise DataError(f"'x' must be uint8 (N, H, W) or (N, H, W, 1|3|4); got {x.dtype} {x.shape}.")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"'y' must be (N,) integers with N = {len(x)}; got {y.dtype} {y.shape}.")
    gray = x.ndim == 3 or x.shape[-1] == 1
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    mode = "L" if x.ndim == 3 else ("RGBA" if x.shape[-1] == 4 else "RGB")
    names = names or [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    images = _squares([Image.fromarray(im, mode) for im in x], side, grayscale)
    return Dataset(images, y.astype(np.int64), tuple(names), "npz", gray)


def _idx_file(path: pathlib.Path, split: str, what: str, required: bool = True) -> pathlib.Path | None:
    prefix = "train" if split == "train" else "t10k"
    stem = f"{prefix}-{what}-idx{3 if what == 'images' else 1}-ubyte"
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (path / name).is_file():
            return path / name
    if required:
        raise DataError(f"{path} has no {stem}[.gz] for the {split} split.")
    return None


def _read_idx(file: pathlib.Path) -> np.ndarray:
    try:
        with (gzip.open if file.suffix == ".gz" else open)(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{file} cannot be read: {exc}.") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{file} is not an unsigned-byte IDX file.")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{file} is truncated inside its header.")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{file} is truncated: {data.size} values for shape {shape}.")
    return data.reshape(shape)


FASHION_MNIST_LABELS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def _load_idx(path: pathlib.Path, split: str, side: int) -> Dataset:
    if split not in ("train", "test"):
        raise DataError(f"IDX data has the splits train and test, not {split!r}.")
    x = _read_idx(_idx_file(path, split, "images"))
    y = _read_idx(_idx_file(path, split, "labels")).astype(np.int64)
    if x.ndim != 3 or len(x) != len(y):
        raise DataError(f"{path}: images {x.shape} and labels {y.shape} do not match.")
    names = FASHION_MNIST_LABELS if "fashion" in path.name.lower() else tuple(str(i) for i in range(int(y.max()) + 1))
    images = _squares([Image.fromarray(im, "L") for im in x], side)
    return Dataset(images, y, tuple(names), "idx", grayscale=True)


def _load_devkit(path: pathlib.Path, split: str, domain: str | None, side: int, grayscale: bool) -> Dataset:
    if not domain:
        raise DataError(f"{path} is a Decathlon devkit: name the domain with --domain (e.g. dtd, aircraft).")
    annotation = path / "annotations" / f"{domain}_{split}.json"
    if not annotation.is_file():
        raise DataError(f"{annotation} does not exist; the devkit has train and val annotations per domain.")
    coco = json.loads(annotation.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    offset = categories[0]["id"]  # the devkit numbers each domain's classes from a per-domain offset
    names = tuple(str(c["name"]) for c in categories)
    by_image = {a["image_id"]: a["category_id"] - offset for a in coco["annotations"]}
    files, labels, unannotated = [], [], []
    for image in coco["images"]:
        if image["id"] not in by_image:
            unannotated.append(f"{image['file_name']}: no annotation in {annotation.name}")
            continue
        relative = pathlib.PurePosixPath(image["file_name"])
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{annotation} names a file outside the devkit: {image['file_name']!r}.")
        files.append(path / relative if (path / relative).exists() else path / "data" / relative)
        labels.append(by_image[image["id"]])
    squares, skipped, gray = _decode_files(files, side, grayscale)
    keep = [i for i, s in enumerate(squares) if s is not None]
    images = np.stack([squares[i] for i in keep]) if keep else np.zeros((0, side, side, 3), np.uint8)
    return Dataset(images, np.asarray(labels, np.int64)[keep], names, "decathlon", gray, tuple(unannotated + skipped))
