"""Decoding and square resizing of single images (Pillow, real files)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dpscale.data import images
from tests import datagen


def _bands(width, height, vertical=False):
    """Three bands (red | green | blue) along the long side; the middle one is the centre."""
    arr = np.zeros((height, width, 3), np.uint8)
    long, third = (height, height // 4) if vertical else (width, width // 4)
    for c, (a, b) in enumerate([(0, third), (third, long - third), (long - third, long)]):
        if vertical:
            arr[a:b, :, c] = 255
        else:
            arr[:, a:b, c] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("vertical", [False, True])
def test_square_is_shorter_side_resize_then_center_crop(vertical):
    # 40x20 (or 20x40): the centred 20x20 square is the green band.
    img = _bands(20, 40, vertical=True) if vertical else _bands(40, 20)
    out = images.square(img, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    inner = out[1:-1] if vertical else out[:, 1:-1]
    assert (inner[..., 1] == 255).all() and inner[..., [0, 2]].max() == 0
    # Same as the two-step recipe: resize the shorter side to 8 (-> 16x8), crop the middle.
    two_step = img.resize((8, 16) if vertical else (16, 8), images.RESAMPLE)
    box = (0, 4, 8, 12) if vertical else (4, 0, 12, 8)
    expected = np.asarray(two_step.crop(box))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2


def test_square_upscales_grey_to_three_equal_channels():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = images.square(images.array_image(grey), 16)
    assert out.shape == (16, 16, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[..., 0].min() < 20 and out[..., 0].max() > 230  # the ramp survives


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    ext = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = datagen.write_image(tmp_path / f"x{ext}", size=(30, 20), mode=mode)
    out = images.load(str(path), 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8


def test_jpeg_draft_decodes_smaller_and_looks_the_same(tmp_path):
    path = datagen.write_image(tmp_path / "big.JPEG", seed=3, size=(500, 375))
    with Image.open(path) as img:
        img.draft("RGB", (64, 64))
        assert img.size == (125, 94)  # libjpeg scaled by 1/4, still >= 64 on both sides
    fast = images.load(str(path), 64, draft=True)
    full = images.load(str(path), 64, draft=False)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


def test_tar_member_reads_exact_bytes(tmp_path):
    folder = tmp_path / "ilsvrc"
    tar = datagen.make_ilsvrc_train_tar(folder, {"n001": 2})
    data = datagen.jpeg_bytes(1, (40, 30), 0)
    offset = tar.read_bytes().find(data)
    member = images.TarMember(str(tar), offset, len(data), "n001_1.JPEG")
    assert images.read_member(member) == data
    handles = {}
    assert images.read_member(member, handles) == data and (os.getpid(), str(tar)) in handles
    handles[os.getpid(), str(tar)].close()
    bad = images.TarMember(str(tar), tar.stat().st_size - 10, 100, "past the end")
    with pytest.raises(OSError, match="truncated tar member"):
        images.read_member(bad)


def test_corrupt_and_truncated_files_raise(tmp_path):
    junk = datagen.garbage(tmp_path / "junk.jpg")
    cut = datagen.truncate(datagen.write_image(tmp_path / "cut.jpg", size=(200, 150)), 0.3)
    for path in (junk, cut):
        with pytest.raises(OSError):
            images.load(str(path), 16)


def test_array_items_must_be_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        images.load(np.zeros((8, 8), np.float32), 8)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        images.load(np.zeros((8, 8, 4), np.uint8), 8)
