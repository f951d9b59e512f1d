"""Decode one image item and make it a square uint8 RGB array (pure functions, Pillow only).

Resizing is "shorter side to `size`, then center crop", done in one Pillow call by resizing the
centered square box of the source (same result, half the work). JPEG draft mode lets libjpeg
decode at 1/2, 1/4 or 1/8 scale (never below the requested size), which is most of the speed.

Conversions to 8-bit RGB (`to_rgb`), the same for every source:
- EXIF orientation is applied (the picture as a viewer shows it: a camera's portrait photo
  stays upright), then the orientation is forgotten;
- 16-bit grey (PNG/TIFF modes I;16*, and I) is scaled to 8 bits, v8 = round(v16 / 257), so
  mid-grey stays mid-grey;
- transparency (RGBA, LA, PA, a palette or grey/RGB image with a transparent colour) is
  composited on black: out = rgb * alpha / 255, so a fully transparent pixel is black whatever
  colour it hides;
- palette, grey and CMYK become RGB by Pillow's `convert`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
#: Recorded in manifest.json: how a decoded picture becomes 8-bit RGB (see the module doc).
CONVERSIONS = (
    "EXIF orientation applied; 16-bit grey scaled by 1/257; transparency composited on black"
)
BACKGROUND = (0, 0, 0)  # what transparent pixels are composited on (see the module doc)
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION = 0x0112  # the EXIF tag
# Image files by their first bytes (a .jfif, a file without extension): magic -> format.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
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


def sniff(head: bytes) -> str | None:
    """The image format that a file's first bytes (16 are enough) announce, or None."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PPM"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as the module doc says: EXIF orientation applied, 16 bits scaled, alpha
    composited on BACKGROUND."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the picture as stored
        orientation = 1
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT:
        wide = np.asarray(img).astype(np.int64)
        eight = np.clip((wide + 128) // 257, 0, 255).astype(np.uint8)
        img = Image.fromarray(eight, mode="L")
    transparent = img.mode in _ALPHA or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if transparent:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


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
    img = to_rgb(img)
    out = img.resize((size, size), RESAMPLE, box=center_box(*img.size))
    return np.asarray(out, dtype=np.uint8)


def open_bytes(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def read_member(member: TarMember, handles: dict | None = None) -> bytes:
    """Read one tar member's bytes at its offset (no extraction, no tar parsing).

    `handles` caches open files per process (a forked worker never uses its parent's, and
    pread has no shared file position, so parallel readers cannot disturb each other).
    """
    if member.size == 0:
        raise OSError("empty file")
    if handles is None:
        with open(member.tar, "rb") as f:
            data = os.pread(f.fileno(), member.size, member.offset)
    else:
        key = (os.getpid(), member.tar)
        f = handles.get(key)
        if f is None:
            f = handles[key] = open(member.tar, "rb")  # noqa: SIM115 - kept per worker
        data = os.pread(f.fileno(), member.size, member.offset)
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
        if os.path.getsize(item) == 0:
            raise OSError("empty file")
        img = Image.open(item)
    with img:
        return square(img, size, draft)
