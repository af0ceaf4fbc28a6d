"""Data sources: image folders, IDX, .npz and the Decathlon devkit, made tiny under tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import logging
import pathlib
import struct

import numpy as np
import pytest
from PIL import Image

from training.data import DataError, Dataset, load_data

SIDE = 12


# ----- helpers -----------------------------------------------------------------------------------


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path: pathlib.Path, array: np.ndarray, mode: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb_class_folder(root: pathlib.Path, classes: dict[str, int], seed: int = 0) -> None:
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            save(root / name / f"{i}.png", noise(14, 10, seed + 100 * c + i), "RGB")


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool, cut: int = 0) -> None:
    """IDX: 0x00 0x00, type 0x08 (unsigned byte), ndim, big-endian uint32 dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if cut:
        raw = raw[:-cut]
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def idx_folder(root: pathlib.Path, compress: bool, n_train: int = 10, n_test: int = 6) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 3
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


def write_npz(path: pathlib.Path, **arrays: np.ndarray) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


# ----- image folders -----------------------------------------------------------------------------


def test_image_folder_mixed_formats(tmp_path):
    root = tmp_path / "pets"
    save(root / "dog" / "a.jpg", noise(20, 12, 1), "RGB")
    save(root / "dog" / "b.png", noise(9, 16, 2, 1), "L")  # grayscale
    save(root / "cat" / "c.bmp", noise(16, 16, 3), "RGB")
    save(root / "cat" / "d.webp", noise(12, 18, 4), "RGB")
    transparent = np.zeros((10, 10, 4), np.uint8)  # fully transparent: laid on white
    save(root / "bird" / "e.png", transparent, "RGBA")
    save(root / "bird" / "f.PNG", np.full((8, 8, 3), (255, 0, 0), np.uint8), "RGB")  # upper-case suffix
    (root / "bird" / "notes.txt").write_text("not an image, and not an image suffix")

    data = load_data(str(root), SIDE)

    assert data.kind == "image-folder"
    assert data.class_names == ("bird", "cat", "dog")  # sorted
    assert data.images.shape == (6, SIDE, SIDE, 3) and data.images.dtype == np.uint8
    assert sorted(np.bincount(data.labels).tolist()) == [2, 2, 2]
    assert data.labels.dtype == np.int64
    assert data.grayscale is False
    assert data.skipped == ()
    bird = data.images[data.labels == 0]
    assert any((im == 255).all() for im in bird)  # the transparent RGBA became white
    assert any((im == np.array([255, 0, 0], np.uint8)).all() for im in bird)  # red, resized, stays red
    gray = data.images[data.labels == 2]  # dog: one of them was mode L -> R == G == B
    assert any((im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all() for im in gray)
    assert "6 images, 3 classes" in data.describe()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_image_folder_splits(tmp_path, split):
    sizes = {"train": 5, "val": 3, "test": 2}
    for i, (name, n) in enumerate(sizes.items()):
        rgb_class_folder(tmp_path / "ds" / name, {"a": n, "b": n}, seed=10 * i)
    data = load_data(f"{tmp_path / 'ds'}:{split}", SIDE)
    assert len(data.labels) == 2 * sizes[split]
    assert data.class_names == ("a", "b")


def test_image_folder_default_split_is_train(tmp_path):
    for name, n in {"train": 4, "val": 1, "test": 2}.items():
        rgb_class_folder(tmp_path / "ds" / name, {"a": n, "b": n})
    data = load_data(str(tmp_path / "ds"), SIDE)
    assert len(data.labels) == 8 and data.class_names == ("a", "b")


@pytest.mark.parametrize("beside", ["val", "test"])
def test_a_train_folder_beside_val_or_test_is_a_split_not_a_class(tmp_path, beside):
    for name, n in {"train": 4, beside: 1}.items():
        rgb_class_folder(tmp_path / "ds" / name, {"a": n, "b": n})
    data = load_data(str(tmp_path / "ds"), SIDE)
    assert len(data.labels) == 8 and data.class_names == ("a", "b")


def test_missing_split_folder(tmp_path):
    rgb_class_folder(tmp_path / "ds" / "train", {"a": 2, "b": 2})
    rgb_class_folder(tmp_path / "ds" / "test", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"{tmp_path / 'ds'}:val", SIDE)


def test_unknown_split_is_refused(tmp_path):
    rgb_class_folder(tmp_path / "ds", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="Unknown split 'dev'"):
        load_data(f"{tmp_path / 'ds'}:dev", SIDE)


def test_grayscale_flag(tmp_path):
    for c in ("a", "b"):
        for i in range(2):
            save(tmp_path / "gray" / c / f"{i}.png", noise(10, 10, i, 1), "L")
            save(tmp_path / "gray" / c / f"{i}.jpg", noise(10, 10, i + 5, 1), "L")
    gray = load_data(str(tmp_path / "gray"), SIDE)
    assert gray.grayscale is True
    assert (gray.images[..., 0] == gray.images[..., 2]).all()

    save(tmp_path / "gray" / "b" / "color.png", noise(10, 10, 9), "RGB")
    assert load_data(str(tmp_path / "gray"), SIDE).grayscale is False


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "ds"
    rgb_class_folder(root, {"a": 3, "b": 3})
    (root / "a" / "x.jpg").write_text("this is text, not a JPEG")
    good = png_bytes(noise(32, 32, 7), "RGB")
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="training.data"):
        data = load_data(str(root), SIDE)
    assert len(data.labels) == 6
    assert np.bincount(data.labels).tolist() == [3, 3]
    assert len(data.skipped) == 2
    assert any("x.jpg" in s for s in data.skipped) and any("truncated.png" in s for s in data.skipped)
    assert "2 unreadable skipped" in data.describe()
    assert sum("skipped unreadable image" in r.getMessage() for r in caplog.records) == 2


def test_class_with_only_unreadable_files(tmp_path):
    root = tmp_path / "ds"
    rgb_class_folder(root, {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"no readable images: \['b'\]"):
        load_data(str(root), SIDE)


def test_folder_errors(tmp_path):
    root = tmp_path / "empty_class"
    rgb_class_folder(root, {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*b has no images"):
        load_data(str(root), SIDE)

    one = tmp_path / "one_class"
    rgb_class_folder(one, {"a": 3})
    with pytest.raises(DataError, match="1 class; a classifier needs at least 2"):
        load_data(str(one), SIDE)

    flat = tmp_path / "flat"
    save(flat / "a.png", noise(8, 8, 0), "RGB")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(str(flat), SIDE)

    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "nowhere"), SIDE)

    (tmp_path / "file.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="Cannot tell what"):
        load_data(str(tmp_path / "file.csv"), SIDE)


# ----- .npz ----------------------------------------------------------------------------------------


def test_npz_gray_with_label_names(tmp_path):
    x = noise(9, 10, 0, 1)[None].repeat(6, 0)
    path = write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), labels=np.array(["zero", "one", "two"]))
    data = load_data(str(path), SIDE)
    assert data.kind == "npz" and data.grayscale is True
    assert data.class_names == ("zero", "one", "two")
    assert data.images.shape == (6, SIDE, SIDE, 3) and data.images.dtype == np.uint8
    assert (data.images[..., 0] == data.images[..., 1]).all()
    np.testing.assert_array_equal(data.labels, [0, 1, 2, 0, 1, 2])


def test_npz_color_and_single_channel(tmp_path):
    color = write_npz(
        tmp_path / "c.npz", x=np.stack([noise(SIDE, SIDE, i) for i in range(4)]), y=np.array([0, 1, 1, 0], np.int32)
    )
    data = load_data(str(color), SIDE)
    assert data.grayscale is False and data.class_names == ("0", "1")
    np.testing.assert_array_equal(data.images[0], noise(SIDE, SIDE, 0))  # same size: untouched
    one = write_npz(
        tmp_path / "one.npz", x=np.stack([noise(8, 8, i, 1) for i in range(4)])[..., None], y=np.array([0, 1, 1, 0])
    )
    assert load_data(str(one), SIDE).grayscale is True


def test_npz_errors(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    cases = {
        "negative": ({"x": x, "y": np.array([0, 1, -1, 1])}, r"Labels must lie in \[0, 1\]"),
        "out_of_names": (
            {"x": x, "y": np.array([0, 1, 2, 1]), "labels": np.array(["a", "b"])},
            r"Labels must lie in \[0, 1\]",
        ),
        "no_y": ({"x": x}, "must hold arrays 'x'"),
        "no_x": ({"y": np.array([0, 1, 0, 1])}, "must hold arrays 'x'"),
        "float_x": ({"x": x.astype(np.float32), "y": np.array([0, 1, 0, 1])}, "'x' must be uint8"),
        "float_y": ({"x": x, "y": np.array([0.0, 1.0, 0.0, 1.0])}, "'y' must be"),
        "short_y": ({"x": x, "y": np.array([0, 1, 0])}, "'y' must be"),
        "bad_channels": ({"x": np.zeros((4, 8, 8, 2), np.uint8), "y": np.array([0, 1, 0, 1])}, "'x' must be"),
        "one_class": ({"x": x, "y": np.zeros(4, np.int64)}, "needs at least 2"),
    }
    for name, (arrays, message) in cases.items():
        path = write_npz(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(DataError, match=message):
            load_data(str(path), SIDE)


# ----- IDX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_train_and_test(tmp_path, compress):
    root = idx_folder(tmp_path / "mnist", compress)
    train = load_data(str(root), SIDE)
    test = load_data(f"{root}:test", SIDE)
    assert train.kind == "idx" and train.grayscale is True
    assert train.images.shape == (10, SIDE, SIDE, 3) and test.images.shape == (6, SIDE, SIDE, 3)
    assert train.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(test.labels, np.arange(6) % 3)
    with pytest.raises(DataError, match="train and test"):
        load_data(f"{root}:val", SIDE)


def test_idx_fashion_names(tmp_path):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", np.zeros((10, 8, 8), np.uint8), True)
    write_idx(root / "train-labels-idx1-ubyte", np.arange(10, dtype=np.uint8), True)
    data = load_data(str(root), SIDE)
    assert data.class_names[0] == "t-shirt" and len(data.class_names) == 10


def test_idx_truncated_data(tmp_path):
    root = idx_folder(tmp_path / "mnist", compress=False)
    write_idx(root / "train-images-idx3-ubyte", np.zeros((10, 8, 8), np.uint8), False, cut=5)
    with pytest.raises(DataError, match="truncated"):
        load_data(str(root), SIDE)


def test_idx_missing_labels_file(tmp_path):
    root = idx_folder(tmp_path / "mnist", compress=True)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_data(f"{root}:test", SIDE)


def test_idx_not_unsigned_byte(tmp_path):
    root = idx_folder(tmp_path / "mnist", compress=False)
    (root / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 10) + bytes(40))
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        load_data(str(root), SIDE)


def test_idx_truncated_gzip(tmp_path):
    root = idx_folder(tmp_path / "mnist", compress=True)
    raw = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError):
        load_data(str(root), SIDE)


def test_idx_truncated_header(tmp_path):
    root = idx_folder(tmp_path / "mnist", compress=False)
    (root / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 10))
    with pytest.raises(DataError):
        load_data(str(root), SIDE)


# ----- Decathlon devkit ---------------------------------------------------------------------------


def devkit(root: pathlib.Path, domain: str = "dom", file_names: dict[str, list[str]] | None = None) -> pathlib.Path:
    """A tiny devkit: categories 10001.. (listed out of order), images under data/<domain>/<split>/."""
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 10003, "name": "gamma"}, {"id": 10001, "name": "alpha"}, {"id": 10002, "name": "beta"}]
    for split, n in (("train", 6), ("val", 3)):
        images, annotations = [], []
        for i in range(n):
            relative = f"{domain}/{split}/{i}.png"
            # the devkit names files from the root ("data/..."); also accept them relative to data/
            name = f"data/{relative}" if i % 2 else relative
            if file_names and split in file_names:
                name = file_names[split][i] if i < len(file_names[split]) else name
            save(root / "data" / relative, noise(10, 14, i), "RGB")
            images.append({"id": 5000 + i, "file_name": name, "width": 14, "height": 10})
            annotations.append({"id": i, "image_id": 5000 + i, "category_id": 10001 + i % 3})
        (root / "annotations" / f"{domain}_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
    return root


def test_devkit_labels_are_zero_based(tmp_path):
    root = devkit(tmp_path / "decathlon")
    train = load_data(str(root), SIDE, domain="dom")
    assert train.kind == "decathlon"
    assert train.class_names == ("alpha", "beta", "gamma")
    np.testing.assert_array_equal(train.labels, [0, 1, 2, 0, 1, 2])
    assert train.images.shape == (6, SIDE, SIDE, 3)
    val = load_data(f"{root}:val", SIDE, domain="dom")
    np.testing.assert_array_equal(val.labels, [0, 1, 2])


def test_devkit_needs_domain_and_annotation(tmp_path):
    root = devkit(tmp_path / "decathlon")
    with pytest.raises(DataError, match="--domain"):
        load_data(str(root), SIDE)
    with pytest.raises(DataError, match=r"other_train\.json does not exist"):
        load_data(str(root), SIDE, domain="other")


@pytest.mark.parametrize("bad", ["../outside.png", "data/../../outside.png", "/etc/passwd"])
def test_devkit_refuses_paths_outside(tmp_path, bad):
    save(tmp_path / "outside.png", noise(8, 8, 0), "RGB")
    root = devkit(tmp_path / "decathlon", file_names={"train": [bad]})
    with pytest.raises(DataError, match="outside the devkit"):
        load_data(str(root), SIDE, domain="dom")


def test_devkit_missing_image_is_skipped(tmp_path):
    root = devkit(tmp_path / "decathlon")
    (root / "data" / "dom" / "train" / "3.png").unlink()
    data = load_data(str(root), SIDE, domain="dom")
    assert len(data.labels) == 5 and len(data.skipped) == 1
    assert "3.png" in data.skipped[0]


def test_devkit_image_without_annotation(tmp_path):
    root = devkit(tmp_path / "decathlon")
    annotation = root / "annotations" / "dom_train.json"
    coco = json.loads(annotation.read_text())
    coco["annotations"] = coco["annotations"][1:]
    annotation.write_text(json.dumps(coco))
    data = load_data(str(root), SIDE, domain="dom")
    assert len(data.labels) == len(coco["images"]) - 1
    assert len(data.skipped) == 1 and "no annotation" in data.skipped[0]


# ----- Dataset.split and channel_stats -----------------------------------------------------------


def synthetic(counts: list[int]) -> Dataset:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
    return Dataset(images, labels, tuple(f"c{i}" for i in range(len(counts))), "npz")


def test_split_is_stratified_and_deterministic():
    data = synthetic([10, 20, 30, 1])
    train, val = data.split(0.2, seed=3)
    assert np.bincount(val.labels, minlength=4).tolist() == [2, 4, 6, 0]  # a lone image stays in train
    assert np.bincount(train.labels, minlength=4).tolist() == [8, 16, 24, 1]
    # together they are the data, each image once
    both = np.concatenate([train.images, val.images]).reshape(len(data.labels), -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, data.images.reshape(len(data.labels), -1)))
    again_train, again_val = data.split(0.2, seed=3)
    np.testing.assert_array_equal(again_val.images, val.images)
    np.testing.assert_array_equal(again_train.labels, train.labels)
    _, other = data.split(0.2, seed=4)
    assert not np.array_equal(other.images, val.images)
    assert train.class_names == val.class_names == data.class_names


def test_split_takes_at_least_one_per_class():
    _, val = synthetic([3, 3]).split(0.01, seed=0)
    assert np.bincount(val.labels).tolist() == [1, 1]


def test_channel_stats():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255  # red: half 1, half 0 -> mean 0.5, std 0.5
    images[..., 1] = 51  # green constant 0.2: std clamped to 1e-3
    images[1, :2, ..., 2] = 255  # blue: a quarter 1
    data = Dataset(images, np.array([0, 1]), ("a", "b"), "npz")
    mean, std = data.channel_stats()
    np.testing.assert_allclose(mean, [0.5, 0.2, 0.25], atol=1e-6)
    np.testing.assert_allclose(std, [0.5, 1e-3, np.sqrt(0.25 * 0.75)], atol=1e-6)
    assert all(0 <= v <= 1 for v in (*mean, *std))


def test_a_subset_may_miss_classes():
    """Golden inputs and splits take subsets; a subset without some class is still a dataset."""
    images = np.zeros((4, SIDE, SIDE, 3), np.uint8)
    data = Dataset(images, np.asarray([0, 0, 1, 1]), ("cats", "dogs"), "image-folder")
    assert data.subset(np.arange(2)).labels.tolist() == [0, 0]


def test_a_large_jpeg_is_decoded_reduced_and_served_exactly_as_evaluated(tmp_path):
    """Training's evaluation input (cached squares, center crop, normalise) equals the service's input for
    the same file, and both come from a draft (reduced-scale) decode close to a full one."""
    from bench.harness.load import camera_jpeg
    from model.bundle import Preprocessing
    from model.preprocessing import open_image, square, to_rgb
    from service.frontend.inference import decode_and_preprocess
    from training.pipeline import eval_inputs

    photos = {name: camera_jpeg(1600, 1200, seed) for seed, name in enumerate(("a", "b"))}
    for name, data in photos.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "photo.jpg").write_bytes(data)
    prep = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resize=72, crop=64, grayscale=False)
    data = load_data(str(tmp_path), side=prep.resize)
    evaluated = eval_inputs(data, prep)

    for i, name in enumerate(data.class_names):
        served = decode_and_preprocess(photos[name], [prep], max_pixels=40_000_000)[0]
        np.testing.assert_array_equal(served, evaluated[i])

    reduced = open_image(photos["a"], min_side=prep.resize)
    assert reduced.size == (200, 150)  # 1/8 scale: the smallest that keeps >= 72 px on the shorter side
    full = square(to_rgb(open_image(photos["a"])), prep.resize).astype(np.float64)
    assert np.abs(square(to_rgb(reduced), prep.resize) - full).mean() < 2.0  # out of 255
    assert open_image(photos["a"], min_side=1200).size == (1600, 1200)  # no reduction below the size asked


def test_gray_rgb_equals_pillows_conversion_bit_for_bit():
    """PIXELS inputs are turned gray in one numpy pass; it must be exactly what decoding does (Pillow)."""
    from model.preprocessing import gray_rgb

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    corners = np.array(np.meshgrid(*[[0, 1, 127, 128, 254, 255]] * 3)).reshape(3, -1).T.astype(np.uint8)
    for batch in (pixels, corners.reshape(1, -1, 1, 3)):
        pillow = np.stack([np.asarray(Image.fromarray(p).convert("L").convert("RGB")) for p in batch])
        assert gray_rgb(batch).dtype == np.uint8
        np.testing.assert_array_equal(gray_rgb(batch), pillow)


def test_normalize_is_the_formula_bit_for_bit():
    """Normalizing runs along rows of pixels in place; its bits are those of the plain per-channel formula,
    for one image, a batch, a cropped (non-contiguous) view and an empty batch."""
    from model.bundle import Preprocessing
    from model.preprocessing import normalize

    prep = Preprocessing(mean=(0.2860, 0.4, 0.5), std=(0.3530, 0.25, 0.1), resize=36, crop=32, grayscale=False)
    std = np.asarray(prep.std, np.float32)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (5, 36, 36, 3), dtype=np.uint8)
    for images in (batch[0], batch, batch[:, 2:34, 2:34], batch[:0]):
        want = images.astype(np.float32) * (np.float32(1 / 255.0) / std) + (-np.asarray(prep.mean, np.float32) / std)
        got = normalize(images, prep)
        assert got.dtype == np.float32 and got.shape == images.shape
        np.testing.assert_array_equal(got, want)
