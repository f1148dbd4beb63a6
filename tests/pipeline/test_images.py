"""Image decoding and validation: every bad input gets a status and a reason; good input decodes to RGB uint8."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import images


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, fmt, **kw) if mode else Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR declares width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
_Y, _X = np.mgrid[0:24, 0:32]
SMOOTH = np.dstack([_X * 8, _Y * 10, (_X + _Y) * 4]).astype(np.uint8)  # JPEG-friendly gradient


def test_rgb_png_round_trip_exact():
    d = images.decode(_encode(RGB, "PNG"))
    assert d.status == images.OK and d.error is None
    assert (d.format, d.width, d.height, d.channels, d.mode) == ("PNG", 32, 24, 3, "RGB")
    assert d.rgb.dtype == np.uint8 and np.array_equal(d.rgb, RGB)


def test_jpeg_decodes_close_and_header_matches():
    data = _encode(SMOOTH, "JPEG", quality=95)
    head = images.read_header(data)
    assert (head.format, head.width, head.height, head.bit_depth) == ("JPEG", 32, 24, 8)
    d = images.decode(data)
    assert d.ok and d.rgb.shape == (24, 32, 3)
    assert np.abs(d.rgb.astype(int) - SMOOTH).mean() < 3


def test_pixels_false_validates_without_returning_pixels():
    d = images.decode(_encode(RGB, "JPEG"), pixels=False)
    assert d.ok and d.rgb is None and (d.width, d.height) == (32, 24)


def test_zero_bytes():
    d = images.decode(b"")
    assert d.status == images.EMPTY and "zero-byte" in d.error


def test_text_file_is_not_an_image():
    d = images.decode(b"name,identity\nthis is a CSV, not a JPEG\n")
    assert d.status == images.NOT_IMAGE and "not a recognised image" in d.error


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg(keep):
    data = _encode(RGB, "JPEG", quality=95)
    d = images.decode(data[: int(len(data) * keep)])
    assert d.status == images.TRUNCATED and "truncated" in d.error.lower()
    assert (d.width, d.height) == (32, 24), "the header still says how big it was"


def test_truncated_png():
    data = _encode(RGB, "PNG")
    d = images.decode(data[: len(data) // 2])
    assert d.status in (images.TRUNCATED, images.CORRUPT) and d.error


def test_decompression_bomb_refused_from_header_before_decoding():
    bomb = png_declaring(100000, 100000)
    assert images.read_header(bomb) == images.HeaderInfo("PNG", 100000, 100000, 8)
    d = images.decode(bomb)
    assert d.status == images.TOO_LARGE
    assert "100000x100000" in d.error and "not decoded" in d.error
    assert (d.width, d.height) == (100000, 100000) and d.rgb is None


def test_pixel_limit_is_configurable():
    d = images.decode(_encode(RGB, "PNG"), max_pixels=32 * 24 - 1)
    assert d.status == images.TOO_LARGE and "32x24" in d.error
    assert images.decode(_encode(RGB, "PNG"), max_pixels=32 * 24).ok


def test_16bit_grayscale_png_scaled_to_8bit():
    a = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85 % 65536).astype(np.uint16)
    d = images.decode(_encode(a, "PNG"))
    assert d.ok and d.mode.startswith("I") and d.channels == 1
    expected = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(d.rgb[..., 0], expected) and np.array_equal(d.rgb[..., 2], expected)
    assert "16-bit grayscale" in d.error


def test_16bit_rgb_png_noted():
    import cv2

    a = (RGB.astype(np.uint16) * 257)[..., ::-1].copy()  # BGR for OpenCV; high byte == RGB
    ok, buf = cv2.imencode(".png", a)
    assert ok
    data = buf.tobytes()
    assert images.read_header(data).bit_depth == 16
    d = images.decode(data)
    assert d.ok and "16-bit" in d.error
    assert np.array_equal(d.rgb, RGB)


def test_grayscale_becomes_three_equal_channels():
    g = RGB[..., 0].copy()
    d = images.decode(_encode(g, "PNG"))
    assert d.ok and d.channels == 1 and d.mode == "L" and "grayscale" in d.error
    assert d.rgb.shape == (24, 32, 3) and all(np.array_equal(d.rgb[..., c], g) for c in range(3))


def test_cmyk_jpeg_converted():
    cyan = np.tile(np.array([255, 0, 0, 0], np.uint8), (16, 16, 1))
    d = images.decode(_encode(cyan, "JPEG", "CMYK", quality=95))
    assert d.ok and d.mode == "CMYK" and d.channels == 4 and "CMYK" in d.error
    assert np.allclose(d.rgb.reshape(-1, 3).mean(0), [0, 255, 255], atol=3)


def test_rgba_and_palette_converted():
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 128, np.uint8)])
    d = images.decode(_encode(rgba, "PNG"))
    assert d.ok and d.channels == 4 and np.array_equal(d.rgb, RGB)
    pal = Image.fromarray(RGB).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    d = images.decode(buf.getvalue())
    assert d.ok and d.mode == "P" and np.array_equal(d.rgb, np.asarray(pal.convert("RGB")))


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    d = images.decode(_encode(RGB, "JPEG", exif=exif))
    assert d.ok and (d.width, d.height) == (24, 32) and d.rgb.shape == (32, 24, 3)
    assert "orientation 6" in d.error


def test_zero_size_header_is_corrupt():
    d = images.decode(png_declaring(0, 10))
    assert d.status == images.CORRUPT and "0x10" in d.error


def test_garbage_after_valid_signature_is_corrupt():
    d = images.decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert d.status in (images.CORRUPT, images.NOT_IMAGE, images.TRUNCATED) and d.error


def test_validation_only_agrees_with_full_decode():
    exif = Image.Exif()
    exif[0x0112] = 8
    cases = [_encode(SMOOTH, "JPEG"), _encode(SMOOTH[..., 0], "JPEG"), _encode(SMOOTH, "JPEG", exif=exif),
             _encode(np.dstack([SMOOTH, SMOOTH[..., :1]]), "JPEG", "CMYK"), _encode(SMOOTH, "PNG")]
    jpeg = cases[0]
    cases += [jpeg[: len(jpeg) // 2], jpeg[:-2]]
    for data in cases:
        full, fast = images.decode(data), images.decode(data, pixels=False)
        assert fast.rgb is None
        assert (fast.status, fast.error, fast.format, fast.width, fast.height, fast.channels, fast.mode) == (
            full.status, full.error, full.format, full.width, full.height, full.channels, full.mode)
        if full.ok:
            assert (full.height, full.width) == full.rgb.shape[:2]


def _jpeg_edge_cases() -> dict[str, bytes]:
    """Plain JPEGs (the validation fast path) and everything that must take the general path, with damage."""
    exif = Image.Exif()
    exif[0x0112] = 6
    tiny = RNG.integers(0, 256, (3, 7, 3), dtype=np.uint8)
    cases = {
        "baseline": _encode(SMOOTH, "JPEG"), "noise q95 4:4:4": _encode(RGB, "JPEG", quality=95, subsampling=0),
        "grayscale": _encode(SMOOTH[..., 0], "JPEG"), "progressive": _encode(SMOOTH, "JPEG", progressive=True),
        "optimized": _encode(RGB, "JPEG", optimize=True),
        "restart markers": _encode(RGB, "JPEG", restart_marker_blocks=1),
        "comment": _encode(SMOOTH, "JPEG", comment=b"a comment"), "7x3": _encode(tiny, "JPEG"),
        "1x1": _encode(tiny[:1, :1], "JPEG"),
        "exif orientation 6": _encode(RGB, "JPEG", exif=exif),
        "icc profile": _encode(RGB, "JPEG", icc_profile=b"\0" * 64),
        "cmyk": _encode(np.dstack([SMOOTH, SMOOTH[..., :1]]), "JPEG", "CMYK"), "png": _encode(RGB, "PNG"),
    }
    plain = cases["baseline"]
    sof = plain.index(b"\xff\xc0")
    dqt = plain.index(b"\xff\xdb")
    scan = plain.index(b"\xff\xda")
    damaged = {
        "truncated in the scan": plain[: (scan + len(plain)) // 2], "no EOI": plain[:-2],
        "truncated in the header": plain[: sof + 6], "trailing bytes": plain + b"\x00garbage",
        "entropy bit flip": plain[:-20] + bytes([plain[-20] ^ 0x10]) + plain[-19:],
        "16-bit frame": plain[: sof + 4] + b"\x10" + plain[sof + 5:],
        "2-layer frame": plain[: sof + 9] + b"\x02" + plain[sof + 10:],
        "short DQT": plain[: dqt + 2] + b"\x00\x20" + plain[dqt + 4:],
        "fill bytes": plain[:dqt] + b"\xff\xff" + plain[dqt:],
        "second frame": plain[:scan] + plain[sof: sof + 2 + int.from_bytes(plain[sof + 2: sof + 4], "big")]
        + plain[scan:],
        "progressive truncated": cases["progressive"][: len(cases["progressive"]) * 2 // 3],
    }
    return cases | damaged


PLAIN = ("baseline", "noise q95 4:4:4", "grayscale", "progressive", "optimized", "restart markers", "comment", "7x3",
         "1x1", "trailing bytes")
NOT_PLAIN = ("exif orientation 6", "icc profile", "cmyk", "png", "16-bit frame", "2-layer frame", "short DQT",
             "fill bytes", "second frame", "truncated in the header")


def test_plain_jpeg_fast_path_equals_the_general_path(monkeypatch):
    """Validating a plain JPEG skips Image.open/draft/load: the outcome must be the general path's, field for field."""
    fast, calls = images._plain_jpeg_decodes, []

    def counting(*args):
        calls.append(fast(*args))
        return calls[-1]

    cases = _jpeg_edge_cases()
    for name, data in cases.items():
        calls.clear()
        monkeypatch.setattr(images, "_plain_jpeg_decodes", counting)
        quick = images.decode(data, pixels=False)
        monkeypatch.setattr(images, "_plain_jpeg_decodes", lambda *a: False)
        assert quick == images.decode(data, pixels=False), name
        frame = images._plain_jpeg(data) if data.startswith(b"\xff\xd8") else None
        if frame:  # the plain walk reads the header read_header reads
            assert images.read_header(data) == images.HeaderInfo("JPEG", frame[0], frame[1], 8), name
        assert (frame is not None) == (name in PLAIN or calls != []), name
        if name in PLAIN:
            assert calls == [True], name
        if name in NOT_PLAIN:
            assert calls == [], name
    monkeypatch.setattr(images, "_plain_jpeg_decodes", fast)
    assert images.decode(cases["grayscale"], pixels=False).error == "grayscale converted to RGB"
    assert images.decode(cases["truncated in the scan"], pixels=False).status == images.TRUNCATED
    assert images.decode(cases["exif orientation 6"], pixels=False).error == "EXIF orientation 6 applied"
