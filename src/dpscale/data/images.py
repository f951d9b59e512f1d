"""Decode one image item and make it a square uint8 RGB array (pure functions, Pillow only).

Resizing is "shorter side to `size`, then center crop", done in one Pillow call by resizing the
centered square box of the source (same result, half the work). JPEG draft mode lets libjpeg
decode at 1/2, 1/4 or 1/8 scale (never below the requested size), which is most of the speed.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# Antialiased bilinear, like torchvision's default Resize on PIL images.
RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class TarMember:
    """An image stored uncompressed in a tar file: `size` bytes at absolute `offset`."""

    tar: str
    offset: int
    size: int
    name: str


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centered square of side min(width, height) as a Pillow box (l, t, r, b)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def square(img: Image.Image, size: int, draft: bool = True) -> np.ndarray:
    """Shorter side to `size`, center crop to size x size, RGB: uint8 (size, size, 3)."""
    if draft:
        # JPEG (and MPO) only, a no-op for other formats: libjpeg scales by 1/2, 1/4 or 1/8
        # while both sides stay >= size, so the resize below still only shrinks.
        img.draft("RGB", (size, size))
    if img.mode != "RGB":
        # Palette/alpha/grey/CMYK -> RGB; alpha is dropped (composited on black by convert).
        img = img.convert("RGB")
    out = img.resize((size, size), RESAMPLE, box=center_box(*img.size))
    return np.asarray(out, dtype=np.uint8)


def open_bytes(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def read_member(member: TarMember, handles: dict | None = None) -> bytes:
    """Read one tar member's bytes by seeking to its offset (no extraction, no tar parsing)."""
    if handles is None:
        with open(member.tar, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
    else:
        f = handles.get(member.tar)
        if f is None:
            f = handles[member.tar] = open(member.tar, "rb")  # noqa: SIM115 - kept per worker
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"truncated tar member: got {len(data)} of {member.size} bytes")
    return data


def array_image(arr: np.ndarray) -> Image.Image:
    """A uint8 (H, W) grey or (H, W, 3) RGB array as a Pillow image."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, mode="RGB")
    raise ValueError(f"expected an (H, W) or (H, W, 3) image array, got shape {arr.shape}")


def load(item, size: int, draft: bool = True, handles: dict | None = None) -> np.ndarray:
    """Decode one item (a file path, a TarMember or a uint8 array) to uint8 (size, size, 3).

    Raises on a corrupt or unreadable image; the caller decides to skip and count it.
    """
    if isinstance(item, np.ndarray):
        return square(array_image(item), size, draft=False)
    if isinstance(item, TarMember):
        img = open_bytes(read_member(item, handles))
    else:
        img = Image.open(item)
    with img:
        return square(img, size, draft)
