"""Training data uploaded as one archive: a zip or a tar (gzip, bzip2 or xz allowed) of one folder per
class, the layout `--data` reads from a directory. It is read and checked in memory, before anything
is stored, so that a bad upload is refused at once with what to fix.

Refused, each with an `ArchiveError` code:
- `not_archive`: neither a zip nor a tar;
- `too_large`, `zip_bomb`: more unpacked bytes than `max_unpacked_bytes`, or a member (or the whole
  archive) unpacking to more than `max_ratio` times its packed size, or a zip member longer than its
  header said. Sizes are checked before a member is read, and reads are bounded, so a bomb costs
  nothing;
- `unsafe_path`, `unsafe_member`: an absolute path, a `..` component, or a link or device in a tar;
- `bad_layout`: images outside a class folder, or folders nested deeper than one class level. One
  common top folder (as zipping a folder makes) is allowed, and so are `train/`, `val/` and `test/`
  folders of class folders, as `--data` reads them;
- `one_class`, `empty_class`, `too_many_classes`, `too_many_images`;
- `undecodable`: images that do not decode, named.
Hidden files, `__MACOSX/` and files that are not images (by suffix) are left out and counted.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import tarfile
import zipfile

import numpy as np

from model.preprocessing import ImageDecodeError, open_image, square, to_rgb
from training.data import IMAGE_SUFFIXES, SPLITS, Dataset

MB = 1024 * 1024
CHECK_SIDE = 32  # the side `check_decodes` decodes JPEGs at (a reduced scale)
GRAY_MODES = ("L", "LA", "I", "I;16", "F", "1")


class ArchiveError(ValueError):
    """An upload that cannot be trained on; `code` names the problem, the message says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    max_unpacked_bytes: int = 1024 * MB
    max_ratio: float = 100.0  # unpacked over packed: images are compressed already, so ~1 is usual
    max_images: int = 50_000
    max_classes: int = 1_000
    max_image_pixels: int = 40_000_000


@dataclasses.dataclass(frozen=True)
class Members:
    """An archive's images by class, unpacked but not decoded."""

    classes: tuple[str, ...]
    images: list[tuple[str, int, str, bytes]]  # (path in the archive, class index, split, bytes)
    left_out: int  # hidden files and files that are not images
    splits: tuple[str, ...] = ("train",)  # train, and val and test where the archive has those folders


LIMITS = ArchiveLimits()


def read_archive(data: bytes, limits: ArchiveLimits = LIMITS) -> Members:
    """The images of a zip or tar upload, by class folder; `ArchiveError` for anything unsafe or unusable."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            files, folders = _read_zip(data, limits)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as exc:  # corrupt, encrypted
            raise ArchiveError("not_archive", f"The zip archive cannot be read: {exc}.") from None
    else:
        with _open_tar(data) as tar:
            files, folders = _read_tar(tar, len(data), limits)
    return _by_class(files, folders, limits)


def _open_tar(data: bytes) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError):
        raise ArchiveError(
            "not_archive", "The upload is neither a zip nor a tar archive; send one folder per class, zipped."
        ) from None


def _read_zip(data: bytes, limits: ArchiveLimits) -> tuple[dict[str, bytes], set[str]]:
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        total = sum(info.file_size for info in infos)
        _check_total(total, len(data), limits)
        for info in infos:
            path = _safe(info.filename)
            if info.is_dir():
                folders.add(path)
                continue
            if info.file_size > limits.max_ratio * max(info.compress_size, 1) and info.file_size > MB:
                raise ArchiveError(
                    "zip_bomb",
                    f"{info.filename!r} unpacks to {info.file_size:,} bytes from {info.compress_size:,}, more "
                    f"than {limits.max_ratio:g} times: that is not an image.",
                )
            if not _wanted(path):
                files[path] = b""
                continue
            with archive.open(info) as member:
                content = member.read(info.file_size + 1)
            if len(content) > info.file_size:
                raise ArchiveError("zip_bomb", f"{info.filename!r} is longer than its header says; the zip is corrupt.")
            files[path] = content
    return files, folders


def _read_tar(tar: tarfile.TarFile, packed: int, limits: ArchiveLimits) -> tuple[dict[str, bytes], set[str]]:
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    total = 0
    while True:
        try:
            member = tar.next()  # members one at a time: the sizes are checked before the next is read
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError("not_archive", f"The tar archive is corrupt: {exc}.") from None
        if member is None:
            break
        path = _safe(member.name)
        if member.isdir():
            folders.add(path)
            continue
        if not member.isfile():
            raise ArchiveError(
                "unsafe_member", f"{member.name!r} is a link or a device; the archive may hold only folders and files."
            )
        total += member.size
        _check_total(total, packed, limits)
        if not _wanted(path):
            files[path] = b""
            continue
        extracted = tar.extractfile(member)
        files[path] = extracted.read(member.size) if extracted is not None else b""
    return files, folders


def _check_total(total: int, packed: int, limits: ArchiveLimits) -> None:
    if total > limits.max_unpacked_bytes:
        raise ArchiveError(
            "too_large",
            f"The archive unpacks to more than {limits.max_unpacked_bytes:,} bytes; send fewer or smaller images.",
        )
    if total > limits.max_ratio * max(packed, 1) and total > MB:
        raise ArchiveError(
            "zip_bomb",
            f"The archive unpacks to {total:,} bytes from {packed:,}, more than {limits.max_ratio:g} times: "
            "images do not compress like that.",
        )


def _safe(name: str) -> str:
    """The member's path, relative and normalised; `unsafe_path` for one that could leave the folder."""
    parts = pathlib.PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
        raise ArchiveError("unsafe_path", f"{name!r} points outside the archive's folder; use relative paths.")
    return "/".join(part for part in parts if part != ".")


def _hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


def _wanted(path: str) -> bool:
    return not _hidden(path) and pathlib.PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def _by_class(files: dict[str, bytes], folders: set[str], limits: ArchiveLimits) -> Members:
    images = {path: data for path, data in files.items() if _wanted(path)}
    left_out = len(files) - len(images)
    dirs = {path for path in folders if not _hidden(path)}
    for path in images:  # the folders that images imply, for archives without folder entries
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    top = {path.split("/")[0] for path in [*images, *dirs]}
    if len(top) == 1 and all(path.count("/") >= 2 for path in images):  # one folder around the rest
        cut = len(next(iter(top))) + 1
        images = {path[cut:]: data for path, data in images.items()}
        dirs = {path[cut:] for path in dirs if len(path) > cut}
        top = {path.split("/")[0] for path in [*images, *dirs]}
    split = "train" in top and top <= set(SPLITS)  # train/, val/, test/ folders of class folders
    level = 1 if split else 0  # where the class folder is in a path
    for path in images:
        if path.count("/") != level + 1:
            where = "outside a class folder" if path.count("/") <= level else "in a folder inside a class folder"
            raise ArchiveError(
                "bad_layout", f"{path!r} lies {where}; put each class's images in one folder named after the class."
            )
    classes = sorted({path.split("/")[level] for path in dirs if path.count("/") == level})
    if len(classes) > limits.max_classes:
        raise ArchiveError("too_many_classes", f"{len(classes)} classes; the limit is {limits.max_classes}.")
    if len(images) > limits.max_images:
        raise ArchiveError("too_many_images", f"{len(images):,} images; the limit is {limits.max_images:,}.")
    if len(classes) < 2:
        raise ArchiveError("one_class", f"The archive has {len(classes)} class folder; a classifier needs at least 2.")
    index = {name: i for i, name in enumerate(classes)}
    members = [
        (path, index[path.split("/")[level]], path.split("/")[0] if split else "train", data)
        for path, data in sorted(images.items())
    ]
    counts = np.bincount([i for _, i, where, _ in members if where == "train"], minlength=len(classes))
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        raise ArchiveError("empty_class", f"These class folders have no images: {empty}. Add images or remove them.")
    return Members(tuple(classes), members, left_out, tuple(sorted({where for _, _, where, _ in members})))


def decode(
    members: Members, side: int, limits: ArchiveLimits = LIMITS, grayscale: bool = False, split: str = "train"
) -> Dataset:
    """One split's images as `side` x `side` squares, decoded as serving decodes them; `undecodable` names
    the failures."""
    chosen = [(path, i, data) for path, i, where, data in members.images if where == split]
    squares, failures, gray = [], [], []
    for path, _, data in chosen:
        try:
            image = open_image(data, limits.max_image_pixels, min_side=side)
        except ImageDecodeError as exc:
            failures.append(f"{path} ({exc})")
            continue
        gray.append(image.mode in GRAY_MODES)
        squares.append(square(to_rgb(image, grayscale), side))
    _refuse(failures)
    labels = np.array([i for _, i, _ in chosen], np.int64)
    return Dataset(np.stack(squares), labels, members.classes, "archive", all(gray))


def check_decodes(members: Members, limits: ArchiveLimits = LIMITS) -> None:
    """Every image of the archive decodes (as serving decodes them), or `undecodable` names those that
    do not: what a submit checks before it stores anything. JPEGs decode at a reduced scale: cheap."""
    failures = []
    for path, _, _, data in members.images:
        try:
            open_image(data, limits.max_image_pixels, min_side=CHECK_SIDE)
        except ImageDecodeError as exc:
            failures.append(f"{path} ({exc})")
    _refuse(failures)


def _refuse(failures: list[str]) -> None:
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        raise ArchiveError("undecodable", f"{len(failures)} images do not decode: {shown}. Remove or replace them.")
