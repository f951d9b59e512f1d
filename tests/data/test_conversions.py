"""Conversions to 8-bit RGB on real files: 16-bit grey, transparency, EXIF orientation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dpscale.data import images


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257 * 64, 32768, 65535]], np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # a 16-bit greyscale PNG
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # Pillow opens it as 16 bits
        out = np.asarray(images.to_rgb(img))
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()
    loaded = images.load(str(path), 4, draft=False)
    assert 100 < int(loaded[:, 2, 0].mean()) < 160  # mid-grey stays mid-grey (was white)


def test_transparency_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere ...
    rgba[:2, :, 3] = 255  # ... opaque on top
    rgba[2:, :, 3] = 0  # ... fully transparent below
    rgba[:, :2, 1] = 100
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with Image.open(path) as img:
        out = np.asarray(images.to_rgb(img))
    assert out[:2, 0].tolist() == [[200, 100, 0]] * 2 and out[:2, 3].tolist() == [[200, 0, 0]] * 2
    assert out[2:].max() == 0  # transparent -> black, whatever colour it hides
    half = Image.fromarray(np.full((2, 2, 4), [200, 100, 50, 128], np.uint8), "RGBA")
    assert np.asarray(images.to_rgb(half))[0, 0].tolist() == [100, 50, 25]
    assert images.BACKGROUND == (0, 0, 0)


def test_palette_transparency_and_grey_alpha_are_composited_too():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (white) transparent
    assert np.asarray(images.to_rgb(pal)).tolist() == [[[0, 0, 0], [10, 20, 30]]]
    la = Image.fromarray(np.array([[[90, 0], [90, 255]]], np.uint8), "LA")
    assert np.asarray(images.to_rgb(la)).tolist() == [[[0, 0, 0], [90, 90, 90]]]


def test_exif_orientation_is_applied(tmp_path):
    # A landscape picture stored with "rotate 90 CW to view" (orientation 6): its left half red.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, quality=95, exif=exif)
    with Image.open(path) as opened:
        upright = images.to_rgb(opened)
    assert upright.size == (20, 40)  # now portrait, as a viewer shows it
    top = np.asarray(upright)[:10].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) is now on top
    square = images.load(str(path), 8, draft=False)
    assert square[0, :, 0].mean() > 200 and square[-1, :, 2].mean() > 200
    plain = tmp_path / "plain.jpg"
    img.save(plain, quality=95)  # no orientation: left stays left
    kept = images.load(str(plain), 8, draft=False)
    assert kept[:, 0, 0].mean() > 200 and kept[:, -1, 2].mean() > 200


def test_an_empty_file_says_so(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(OSError, match="^empty file$"):
        images.load(str(empty), 8)
    assert empty.stat().st_size == 0
