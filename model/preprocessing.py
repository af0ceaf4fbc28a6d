"""From image bytes to the model's input, the same way in training, evaluation and serving.

The steps follow a bundle's `Preprocessing`: decode (first frame, EXIF orientation applied), to RGB
(grayscale, alpha, palette, CMYK and 16-bit images included; or to gray and back for grayscale
domains), shorter side resized to `resize` (bilinear) and center-cropped to a `resize` square, then
center-cropped to `crop`, scaled to [0, 1] and normalised with the domain's mean and std.
Training caches the `resize` squares and crops them at random; evaluation and serving take the
center crop. A large JPEG is decoded at a reduced scale first (Pillow's draft mode: 1/2, 1/4 or 1/8,
in the DCT domain, never below `resize` on the shorter side) and then resized exactly: a 12-megapixel
photo decodes several times faster. Evaluation and serving decode the same way, so their inputs stay
equal.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from model.safetensors_io import InvalidFileError

DEFAULT_MAX_PIXELS = 40_000_000


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; training and serving both follow it.

    RGB (or grayscale replicated to 3 channels when `grayscale`), shorter side resized to `resize`
    with bilinear interpolation, center crop `crop` x `crop`, scaled to [0, 1], then
    `(x - mean) / std` per channel.
    """

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    resize: int = 72
    crop: int = 64
    grayscale: bool = False

    @classmethod
    def for_input_size(cls, input_size: int, **changes: object) -> Preprocessing:
        """The reference's eval transform scaled to `input_size`: resize to 9/8 of it, center crop."""
        return cls(resize=round(input_size * 9 / 8), crop=input_size, **changes)

    @classmethod
    def from_json(cls, value: object, input_size: int) -> Preprocessing:
        try:
            if not isinstance(value, dict):
                raise TypeError("it must be a JSON object")
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise TypeError(f"unknown keys {unknown}")
            prep = cls(
                mean=tuple(float(v) for v in value["mean"]),
                std=tuple(float(v) for v in value["std"]),
                resize=int(value["resize"]),
                crop=int(value["crop"]),
                grayscale=value.get("grayscale", False),
            )
            if not isinstance(prep.grayscale, bool):
                raise TypeError("grayscale must be true or false")
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidFileError("metadata", f"The bundle's preprocessing is malformed: {exc!r}.") from None
        problems = []
        if len(prep.mean) != 3 or len(prep.std) != 3:
            problems.append("mean and std need 3 values each")
        if not all(np.isfinite(prep.mean)) or not all(np.isfinite(s) and s > 0 for s in prep.std):
            problems.append("mean must be finite and std positive")
        if prep.crop != input_size:
            problems.append(f"crop {prep.crop} must equal the input size {input_size}")
        if not prep.crop <= prep.resize <= 4 * prep.crop:
            problems.append(f"resize {prep.resize} must lie between crop and 4 x crop")
        if problems:
            raise InvalidFileError("metadata", "The bundle's preprocessing is invalid: " + "; ".join(problems) + ".")
        return prep

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class ImageDecodeError(ValueError):
    """An input that is not a usable image. `code`: not_image, too_many_pixels or corrupt."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def open_image(
    source: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode an image (first frame of an animation) with EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing. With `min_side` (the `resize` that follows), a JPEG is decoded at the smallest
    of its reduced scales whose shorter side keeps at least `min_side` pixels.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():  # Pillow's own, higher limit warns first: the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels",
                    f"The image is {width}x{height} pixels, more than the "
                    f"limit of {max_pixels:,}; send a smaller image.",
                )
            image.seek(0)
            if min_side is not None and min(width, height) > min_side:
                scale = min_side / min(width, height)
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))  # a no-op but for JPEG
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
            return image
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses in `open` over twice its limit: say ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise ImageDecodeError(
            "too_many_pixels", f"The image is {size}, more than the limit of {max_pixels:,}; send a smaller image."
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "not_image", "The file is not an image format we read (JPEG, PNG, WebP, BMP, GIF)."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or damaged data
        raise ImageDecodeError("corrupt", f"The image is damaged and cannot be decoded: {exc}") from None


def to_rgb(image: Image.Image, grayscale: bool = False) -> Image.Image:
    """8-bit RGB: 16-bit and float images are rescaled, transparency is laid on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 255.0 if image.mode == "F" or array.max(initial=0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if grayscale else "RGB")
    return image.convert("RGB") if grayscale else image


def gray_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] to gray replicated over 3 channels, bit for bit as Pillow's `convert("L")`
    (ITU-R 601-2 luma in 16-bit fixed point, rounded), for any number of images in one numpy pass."""
    r, g, b = (pixels[..., c].astype(np.uint32) for c in range(3))
    gray = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def square(image: Image.Image, side: int) -> np.ndarray:
    """Shorter side resized to `side` (bilinear), center `side` x `side` crop: uint8 (side, side, 3)."""
    width, height = image.size
    scale = side / min(width, height)
    new_size = (max(side, round(width * scale)), max(side, round(height * scale)))
    resized = image.resize(new_size, Image.Resampling.BILINEAR)
    left, top = (new_size[0] - side) // 2, (new_size[1] - side) // 2
    return np.asarray(resized.crop((left, top, left + side, top + side)), dtype=np.uint8)


def center_crop(squares: np.ndarray, crop: int) -> np.ndarray:
    """Center crop of the last-but-one two axes of (..., side, side, C) arrays."""
    side = squares.shape[-2]
    offset = (side - crop) // 2
    return squares[..., offset : offset + crop, offset : offset + crop, :]


@functools.lru_cache(maxsize=64)
def _row_affine(mean: tuple[float, ...], std: tuple[float, ...], width: int) -> tuple[np.ndarray, np.ndarray]:
    """`normalize`'s scale and offset over a row of `width` RGB pixels."""
    std_ = np.asarray(std, np.float32)
    scale = np.tile(np.float32(1 / 255.0) / std_, width)
    offset = np.tile(-np.asarray(mean, np.float32) / std_, width)
    scale.flags.writeable = offset.flags.writeable = False
    return scale, offset


def normalize(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 images [..., W, 3] -> float32 `(x / 255 - mean) / std`, computed as `x * (1 / (255 std)) - mean / std`
    in place over rows of W pixels: numpy's inner loop then runs along a row, not over a pixel's 3 channels
    (four times faster, the same bits)."""
    width = images.shape[-2]
    scale, offset = _row_affine(tuple(prep.mean), tuple(prep.std), width)
    out = images.reshape(-1, width * 3).astype(np.float32)
    out *= scale
    out += offset
    return out.reshape(images.shape)


def preprocess(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """One decoded image (`open_image(..., min_side=prep.resize)`) -> the model's float32 (crop, crop, 3)
    input for a domain."""
    return normalize(center_crop(square(to_rgb(image, prep.grayscale), prep.resize), prep.crop), prep)
