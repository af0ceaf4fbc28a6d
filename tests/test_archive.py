"""Training archives (`training.archive`): a zip or tar of one folder per class, checked in memory; every
bad upload is refused with its own code before anything is stored."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from training.archive import LIMITS, ArchiveError, ArchiveLimits, decode, read_archive


def png(value: int, size: int = 12) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, "PNG")
    return out.getvalue()


def zipped(files: dict[str, bytes], folders: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            archive.writestr(folder.rstrip("/") + "/", b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def tarred(files: dict[str, bytes], mode: str = "w:gz", links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return out.getvalue()


GOOD = {"shop/cat/1.png": png(10), "shop/cat/2.png": png(20), "shop/dog/1.png": png(200), "shop/readme.txt": b"hi"}


def refused(data: bytes, code: str, limits: ArchiveLimits = LIMITS) -> str:
    with pytest.raises(ArchiveError) as caught:
        decode(read_archive(data, limits), side=8, limits=limits)
    assert caught.value.code == code, str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("pack", [zipped, tarred, lambda f: tarred(f, "w")], ids=["zip", "tar.gz", "tar"])
def test_one_folder_per_class_under_one_top_folder_is_a_dataset(pack):
    members = read_archive(pack(GOOD))
    assert members.classes == ("cat", "dog") and members.left_out == 1
    data = decode(members, side=8)
    assert data.images.shape == (3, 8, 8, 3) and data.labels.tolist() == [0, 0, 1]
    assert data.images[2].min() == 200 and data.class_names == ("cat", "dog")


def test_not_an_archive():
    assert "neither a zip nor a tar" in refused(png(1), "not_archive")


def test_a_member_that_unpacks_far_beyond_its_size_is_a_bomb():
    assert "times" in refused(zipped({"a/x.png": png(1), "b/bomb.png": bytes(20 * 1024 * 1024)}), "zip_bomb")


def test_a_gzipped_tar_of_zeros_is_a_bomb():
    refused(tarred({"a/x.png": png(1), "b/bomb.png": bytes(20 * 1024 * 1024)}), "zip_bomb")


def test_more_unpacked_bytes_than_the_limit():
    limits = ArchiveLimits(max_unpacked_bytes=100)
    refused(zipped(GOOD), "too_large", limits)


@pytest.mark.parametrize("name", ["../cat/1.png", "/etc/cat/1.png", "cat/../../1.png", "C:/cat/1.png"])
def test_paths_that_leave_the_folder(name):
    refused(zipped({name: png(1), "dog/1.png": png(2)}), "unsafe_path")


def test_links_in_a_tar():
    refused(tarred({"cat/1.png": png(1), "dog/1.png": png(2)}, links={"dog/2.png": "/etc/passwd"}), "unsafe_member")


def test_images_outside_a_class_folder_or_nested_deeper():
    refused(zipped({"cat/1.png": png(1), "loose.png": png(2)}), "bad_layout")
    refused(zipped({"a/cat/1.png": png(1), "b/dog/x/1.png": png(2)}), "bad_layout")


def test_one_class_only():
    refused(zipped({"cat/1.png": png(1), "cat/2.png": png(2)}), "one_class")


def test_a_class_folder_with_no_image():
    assert "['dog']" in refused(zipped({"cat/1.png": png(1), "dog/notes.txt": b"x"}, ("dog",)), "empty_class")


def test_images_that_do_not_decode_are_named():
    message = refused(zipped({"cat/1.png": png(1), "dog/broken.png": b"not a png"}), "undecodable")
    assert "dog/broken.png" in message


def test_too_many_images_or_classes():
    refused(zipped(GOOD), "too_many_images", ArchiveLimits(max_images=2))
    refused(zipped(GOOD), "too_many_classes", ArchiveLimits(max_classes=1))


def test_hidden_files_and_macos_folders_are_left_out():
    files = {"cat/1.png": png(1), "dog/1.png": png(2), "__MACOSX/cat/._1.png": b"junk", "cat/.DS_Store": b"x"}
    members = read_archive(zipped(files))
    assert members.classes == ("cat", "dog") and members.left_out == 2


def test_train_val_test_folders_of_class_folders_are_splits():
    files = {
        f"set/{split}/{c}/{i}.png": png(10 * i) for split in ("train", "val") for c in ("cat", "dog") for i in (1, 2)
    }
    members = read_archive(zipped(files))
    assert members.classes == ("cat", "dog") and members.splits == ("train", "val")
    assert len(decode(members, side=8, split="val").labels) == 4
