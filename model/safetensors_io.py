"""Reading and writing `.safetensors` files safely: validated headers, atomic writes.

Uploads are untrusted: the header is parsed and checked (size, JSON, dtypes, offsets that cover
the data exactly) before any tensor is read, and only finite float32 tensors are accepted. Tensors are
read-only views into the file's bytes (no copy); files are written by the `safetensors` library.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
import tempfile
from typing import Annotated, Literal, NoReturn

import msgspec
import numpy as np
import safetensors.numpy

MAX_HEADER_BYTES = 16 * 1024 * 1024


class InvalidFileError(ValueError):
    """A weights file that cannot be used, with a machine-readable `code` and a message that says the fix.

    Codes: not_safetensors, format, format_version, metadata, tensors, non_finite, fingerprint,
    labels, domain_name, golden.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # crosses process boundaries (the service's loader processes) whole
        return type(self), (self.code, str(self))


class _Tensor(msgspec.Struct):
    """One header entry as a well-formed file has it (checked in C by msgspec: most of a load's header cost)."""

    dtype: Literal["F32"]
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    data_offsets: tuple[Annotated[int, msgspec.Meta(ge=0)], Annotated[int, msgspec.Meta(ge=0)]]


def read_safetensors(data: bytes, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into (float32 tensors, metadata); raise `InvalidFileError` if malformed."""
    hint = f"The {what} is not a valid .safetensors file"
    if len(data) < 8:
        raise InvalidFileError("not_safetensors", f"{hint}: it has only {len(data)} bytes.")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):  # what a file of another kind looks like
        raise InvalidFileError(
            "not_safetensors",
            f"The {what} is not a .safetensors file (it does not start with a "
            "safetensors header); send the .safetensors file that training "
            "wrote.",
        )
    try:
        header = msgspec.json.decode(memoryview(data)[8 : 8 + header_len])
    except msgspec.DecodeError as exc:
        raise InvalidFileError("not_safetensors", f"{hint}: its header is not JSON ({exc}).") from None
    if not isinstance(header, dict):
        raise InvalidFileError("not_safetensors", f"{hint}: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidFileError("metadata", f"{hint}: __metadata__ must map names to strings.")
    start, size = 8 + header_len, len(data) - 8 - header_len
    try:
        entries = msgspec.convert(header, dict[str, _Tensor])
    except msgspec.ValidationError as exc:
        _refuse_entries(header, size, what, str(exc))  # says which entry and why
    spans = sorted((e.data_offsets[0], e.data_offsets[1], e.shape, name) for name, e in entries.items())
    position = 0
    for begin, end, shape, name in spans:  # the buffer is covered exactly: no overlap, no hole
        if begin != position or end > size or end - begin != 4 * math.prod(shape):
            _refuse_entries(header, size, what, f"tensor {name!r}")
        position = end
    if position != size:
        raise InvalidFileError("not_safetensors", f"{hint}: {size - position} bytes after the last tensor's data.")
    # views into `data`, not copies: a bundle's tensors are read once and folded (read-only arrays)
    flat = np.frombuffer(data, np.float32, size // 4, start)
    if not np.isfinite(flat).all():  # one pass over every value; naming the culprits only on failure
        bad = sorted(name for begin, end, _, name in spans if not np.isfinite(flat[begin // 4 : end // 4]).all())
        raise InvalidFileError("non_finite", f"The {what} has NaN or infinite values in {bad}.")
    tensors = {
        name: flat[begin // 4 : end // 4] if len(shape) == 1 else flat[begin // 4 : end // 4].reshape(shape)
        for begin, end, shape, name in spans
    }
    return tensors, dict(metadata)


def _refuse_entries(header: dict, size: int, what: str, detail: str) -> NoReturn:
    """Raise the `InvalidFileError` that names the header entry at fault (for a header that failed the checks)."""
    hint = f"The {what} is not a valid .safetensors file"
    bad_dtypes = sorted(k for k, v in header.items() if not isinstance(v, dict) or v.get("dtype") != "F32")
    if bad_dtypes:
        raise InvalidFileError("tensors", f"The {what} must hold float32 tensors only; these are not: {bad_dtypes}.")
    position = 0
    for begin, end, _, name in sorted(_span(name, info, size, hint) for name, info in header.items()):
        if begin != position:
            raise InvalidFileError(
                "not_safetensors",
                f"{hint}: the data of tensor {name!r} starts at byte {begin}, "
                f"not at {position} where the previous one ends.",
            )
        position = end
    raise InvalidFileError("not_safetensors", f"{hint}: its tensor entries are malformed ({detail}).")


def _span(name: str, info: dict, size: int, hint: str) -> tuple[int, int, tuple[int, ...], str]:
    """(begin, end, shape, name) of one tensor's entry, checked against the data's `size` in bytes."""
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (
        type(shape) is list
        and type(offsets) is list
        and len(offsets) == 2
        and all(type(d) is int and d >= 0 for d in shape)
        and type(offsets[0]) is int
        and type(offsets[1]) is int
    ):
        raise InvalidFileError("not_safetensors", f"{hint}: tensor {name!r} has no valid shape and data_offsets.")
    begin, end = offsets
    if not 0 <= begin <= end <= size or end - begin != 4 * math.prod(shape):
        raise InvalidFileError(
            "not_safetensors",
            f"{hint}: tensor {name!r} has data_offsets {offsets}, which do not "
            f"hold its shape {shape} inside the file's {size} bytes of data.",
        )
    return begin, end, tuple(shape), name


def parse_json_metadata(metadata: dict[str, str], key: str, what: str) -> object:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise InvalidFileError("metadata", f"The {what}'s metadata {key!r} is not valid JSON ({exc}).") from None


def write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialise float32 tensors with string metadata (the caller's dict is not changed)."""
    arrays = {k: np.require(v, dtype=np.float32, requirements="C") for k, v in tensors.items()}  # keeps 0-d shapes
    return safetensors.numpy.save(arrays, metadata=dict(metadata))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a part."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_bytes(source: str | os.PathLike | bytes) -> bytes:
    return source if isinstance(source, (bytes, bytearray)) else pathlib.Path(source).read_bytes()
