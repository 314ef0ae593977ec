"""Checks on image bytes before they go into a dataset: the size from the header, and a
decode that notices corrupt JPEG data.

- :func:`header_size` reads width and height without decoding the pixels (Pillow reads only
  the header when it opens a file), so a small file that would decode into gigabytes can be
  refused before it is decoded.
- :func:`decode_checked` decodes with OpenCV and reports what libjpeg says about the data;
  :func:`read_image_file` reads a file with it (what the inference tools read images with).
  A JPEG whose entropy-coded data is damaged decodes without an error: libjpeg only prints
  "Corrupt JPEG data: ..." or "Premature end of JPEG file" on the process's standard error
  and fills the damaged blocks with garbage. Neither OpenCV, Pillow nor torchvision report
  it to the caller (checked: all three return a full image), so the decode runs with file
  descriptor 2 redirected to a temporary file and the messages are read back from it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator

import cv2
import numpy as np

#: libjpeg warnings that mean the pixel data is damaged (not merely unusual metadata).
CORRUPTION_MESSAGES = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters")


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the image header, or None when no header can be read."""
    from PIL import Image

    # Pillow refuses to open an image over its own decompression-bomb limit (about 179
    # million pixels) and so would hide the size; the caller applies its own limit, so
    # Pillow's is lifted while the header is read (prepare reads images one per process).
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # not an image Pillow knows: let the decoder decide
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def decode_checked(data: bytes, flags: int) -> tuple[np.ndarray | None, str | None]:
    """``cv2.imdecode`` of ``data``, plus the decoder's corruption message (None if clean); no
    image (None) for data OpenCV can't decode, an empty file included (its own error there)."""
    if data[:3] != b"\xff\xd8\xff":  # only libjpeg's warnings are known to mean damaged pixels
        return imdecode(data, flags), None
    with _stderr_captured() as captured:
        pixels = imdecode(data, flags)
    lines = [line.strip() for line in captured().splitlines()]
    problems = [line for line in lines if line.startswith(CORRUPTION_MESSAGES)]
    for line in lines:
        if line and line not in problems:  # anything else the decoder said is the user's to see
            print(line, file=sys.stderr)
    return pixels, problems[0] if problems else None


def imdecode(data: bytes, flags: int) -> np.ndarray | None:
    """``cv2.imdecode`` of ``data``; None for data it can't decode, whether OpenCV returns None
    (most data) or raises (an empty buffer)."""
    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None


def read_image_file(path: str | os.PathLike) -> tuple[np.ndarray | None, str | None]:
    """``(BGR uint8 [H, W, 3], None)`` of an image file, or ``(None, why it can't be used)``.

    The pixels as stored: EXIF orientation is ignored, as everywhere in the project (the
    annotations and the training data refer to the stored pixels). A JPEG whose data libjpeg
    reports damaged is refused (``corrupt image data (...)``), not returned half grey.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, e.strerror or type(e).__name__
    if not data:
        return None, "empty file"
    bgr, corrupt = decode_checked(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        return None, "not a readable image"
    if corrupt:
        return None, f"corrupt image data ({corrupt})"
    return bgr, None


@contextlib.contextmanager
def _stderr_captured() -> Iterator:
    """Redirect file descriptor 2 (what C libraries write to) to a temporary file; yields a
    function that returns what was written once the block has ended."""
    text = ""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lambda: text
            finally:
                os.dup2(saved, 2)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
    finally:
        os.close(saved)
