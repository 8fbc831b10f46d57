"""Placeholder images: small, real PNG files written with zlib and struct alone.

Each image has a colour derived from the task id (and its index), a lighter diagonal band so two
images can be told apart at a glance, and the aspect ratio of the requested size.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Placeholder sizes per aspect ratio: small, but with the shape of the real image.
PLACEHOLDER_SIZES: dict[str, tuple[int, int]] = {"1:1": (64, 64), "2:3": (64, 96), "3:2": (96, 64)}
# The dimensions a real provider reports for each aspect ratio.
NOMINAL_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (1024, 1536),
    "3:2": (1536, 1024),
}
# Pixels closer than this to the diagonal are drawn lighter.
BAND_HALF_WIDTH = 6


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG from ``height`` rows of ``width * 3`` bytes each."""
    if width <= 0 or height <= 0 or len(rows) != height:
        raise ValueError("need height rows of a positive size")
    if any(len(row) != width * 3 for row in rows):
        raise ValueError("each row must hold width * 3 bytes (RGB)")
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Filter type 0 (None) before every scanline.
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def colour_for(task_id: str, index: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{task_id}/{index}".encode()).digest()
    # Keep the colour away from black and white so the band stays visible.
    return (40 + digest[0] % 160, 40 + digest[1] % 160, 40 + digest[2] % 160)


@functools.lru_cache(maxsize=256)
def placeholder_png(task_id: str, index: int, aspect: str = "1:1") -> bytes:
    width, height = PLACEHOLDER_SIZES.get(aspect, PLACEHOLDER_SIZES["1:1"])
    red, green, blue = colour_for(task_id, index)
    base = bytes((red, green, blue))
    light = bytes((min(255, red + 70), min(255, green + 70), min(255, blue + 70)))
    rows = []
    for y in range(height):
        # The band: pixels less than BAND_HALF_WIDTH from the diagonal, built a run at a time
        # (pixel by pixel, each image held the event loop about 2 ms longer).
        centre = y * width // height
        start = max(0, centre - BAND_HALF_WIDTH + 1)
        end = min(width, centre + BAND_HALF_WIDTH)
        rows.append(base * start + light * (end - start) + base * (width - end))
    return encode_png(width, height, rows)
