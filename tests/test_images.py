"""ssd/data/images.py: image sizes from headers, and JPEG damage the decoder only prints."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from ssd.data.images import decode_checked, header_size
from test_bad_inputs import scramble_jpeg
from test_prepare import _jpeg

FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def png_header(width: int, height: int) -> bytes:
    """A PNG of ``width x height`` whose pixel data is one byte: a header to read, nothing to decode."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00") + chunk(b"IEND", b"")


def test_header_size_reads_sizes_past_pillows_own_limit_without_decoding():
    assert header_size(_jpeg(0, 40, 30)) == (40, 30)
    assert header_size(png_header(20000, 20000)) == (20000, 20000)  # 400 million pixels
    assert header_size(b"not an image") is None


def test_decode_checked_reports_damaged_jpeg_data_and_passes_clean_images():
    clean = _jpeg(1, 160, 120)
    pixels, damage = decode_checked(clean, FLAGS)
    assert pixels.shape == (120, 160, 3) and damage is None
    pixels, damage = decode_checked(scramble_jpeg(clean), FLAGS)
    assert pixels is not None and damage.startswith("Corrupt JPEG data")  # decodes, with garbage
    png = cv2.imencode(".png", np.zeros((5, 6, 3), np.uint8))[1].tobytes()
    assert decode_checked(png, FLAGS)[1] is None


def test_an_empty_file_is_no_image_not_an_opencv_exception(tmp_path):
    """cv2.imdecode raises on an empty buffer (it returns None for other undecodable data): a
    zero-byte photo was a traceback in predict, detect and the benchmark."""
    from ssd.data.images import read_image_file
    from ssd.data.samples import _decode_image
    from ssd.errors import InputError

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert decode_checked(b"", cv2.IMREAD_COLOR) == (None, None)
    assert read_image_file(empty) == (None, "empty file")
    try:
        _decode_image(b"", "shard.tar: sample 'x'")
    except InputError as e:
        assert str(e) == "shard.tar: sample 'x': cannot decode the image (0 bytes)"
    else:
        raise AssertionError("an empty image decoded")
