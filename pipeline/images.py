"""Decode and validate encoded image bytes: a status and a reason for every input, RGB uint8 when usable.

The declared size is read from the file header BEFORE any pixel is decoded, so a
file claiming 100000x100000 pixels is refused without allocating anything.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Sample statuses (the `status` column of `samples`); everything but OK is unusable.
OK = "ok"
EMPTY = "empty"  # zero bytes
NOT_IMAGE = "not_image"  # no known image signature
TRUNCATED = "truncated"  # the encoded stream ends early
CORRUPT = "corrupt"  # the decoder rejected the stream
TOO_LARGE = "too_large"  # declared pixel count or byte size above the limit
UNREADABLE = "unreadable"  # the source could not be read (permissions, not a regular file)
MISSING = "missing"  # the source does not exist (e.g. a broken symlink)
BAD_ENTRY = "bad_entry"  # the dataset's own index/list entry is malformed
STATUSES: tuple[str, ...] = (OK, EMPTY, NOT_IMAGE, TRUNCATED, CORRUPT, TOO_LARGE, UNREADABLE, MISSING, BAD_ENTRY)

MAX_PIXELS = 50_000_000  # about 7000x7000; face datasets are far below this
MAX_BYTES = 256 * 1024 * 1024  # larger encoded files are refused without being read

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0-SOF15 minus DHT, JPG and DAC) carry the frame size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# A "plain" JPEG (see _plain_jpeg) has before its first scan only JFIF/APP0, DQT, DHT, DRI and COM segments
# and one Huffman-coded baseline, extended or progressive frame of 1 or 3 layers (no EXIF/XMP, ICC, MPO,
# Adobe or other APPn segments): Pillow opens it as an L or RGB JpegImageFile with nothing else to read.
_PLAIN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_PLAIN_SEGMENTS = frozenset({0xE0, 0xDB, 0xC4, 0xDD, 0xFE}) | _PLAIN_FRAMES


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """What a file header declares, read without decoding: format, size and bit depth when known."""

    format: str | None
    width: int | None
    height: int | None
    bit_depth: int | None = None


@dataclass(slots=True)
class DecodedImage:
    """The outcome of decoding one encoded image.

    `rgb` is an (H, W, 3) uint8 array when status is OK and pixels were requested.
    `error` holds the reason for a failure, or a conversion note for an OK image
    that was not plain 8-bit RGB (grayscale, 16-bit, CMYK, alpha, palette, EXIF rotation).
    """

    status: str
    error: str | None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    channels: int | None = None
    mode: str | None = None
    rgb: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def read_header(data: bytes) -> HeaderInfo:
    """Declared format and size from the first bytes of PNG, JPEG, GIF and BMP files (others: unknown)."""
    if data.startswith(_PNG_SIG) and len(data) >= 25 and data[12:16] == b"IHDR":
        w, h, depth = struct.unpack(">IIB", data[16:25])
        return HeaderInfo("PNG", w, h, depth)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return HeaderInfo("GIF", w, h, 8)
    if data.startswith(b"BM") and len(data) >= 30:
        w, h, _, bpp = struct.unpack("<iiHH", data[18:30])
        return HeaderInfo("BMP", abs(w), abs(h), bpp)
    return HeaderInfo(None, None, None)


def _jpeg_header(data: bytes) -> HeaderInfo:
    """Walk JPEG marker segments up to the first start-of-frame and read its size."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS and pos + 9 <= n:
            depth, h, w = struct.unpack(">BHH", data[pos + 4 : pos + 9])
            return HeaderInfo("JPEG", w, h, depth)
        pos += 2 + length
    return HeaderInfo("JPEG", None, None)


def _plain_jpeg(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, layers) of a plain JPEG (see _PLAIN_SEGMENTS), None for any other bytes.

    Every segment up to the first scan must be complete and one of _PLAIN_SEGMENTS, right after the
    previous one (no fill or junk bytes), with exactly one 8-bit frame of 1 or 3 layers, a JFIF APP0
    long enough for its version and only whole quantization tables: what Pillow's JPEG plugin reads
    without an error, a warning or anything but the frame's size and mode. The frame is then also the
    first start-of-frame _jpeg_header finds.
    """
    pos, n, frame = 2, len(data), None
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        end = pos + 2 + (data[pos + 2] << 8 | data[pos + 3])
        if end < pos + 4 or end > n:  # a length below 2, or a segment running past the data
            return None
        if marker == 0xDA:  # start of scan: the header part ends here
            return frame
        if marker in _PLAIN_FRAMES:  # precision, height, width, layers, then 3 bytes per layer
            if frame or end - pos < 10 or data[pos + 4] != 8 or data[pos + 9] not in (1, 3) or (end - pos - 10) % 3:
                return None
            frame = (data[pos + 7] << 8 | data[pos + 8], data[pos + 5] << 8 | data[pos + 6], data[pos + 9])
        elif marker == 0xDB:
            if not _dqt_complete(data, pos + 4, end):
                return None
        elif marker not in _PLAIN_SEGMENTS or (marker == 0xE0 and end - pos < 11 and data.startswith(b"JFIF", pos + 4)):
            return None
        pos = end
    return None


def _dqt_complete(data: bytes, pos: int, end: int) -> bool:
    """Whether the DQT segment data[pos:end] holds only complete quantization tables (8- or 16-bit)."""
    while pos < end:
        pos += 65 if data[pos] >> 4 == 0 else 129
        if pos > end:
            return False
    return True


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS, pixels: bool = True) -> DecodedImage:
    """Decode encoded image bytes to RGB uint8, or say why they are unusable.

    The whole stream is always decoded (that is what proves a JPEG is not truncated).
    `pixels=False` validates only and returns `rgb=None`: a JPEG is then decoded with
    DCT scaling (every entropy-coded byte is still parsed, the inverse DCT runs at 1/8
    size), which is about twice as fast; a plain JPEG (`_plain_jpeg`) goes straight to
    Pillow's decoder, without Image.open's Python header parsing (about 1.8x faster again).
    """
    if len(data) == 0:
        return DecodedImage(EMPTY, "zero-byte file")
    frame = None if pixels or not data.startswith(b"\xff\xd8") else _plain_jpeg(data)
    head = HeaderInfo("JPEG", frame[0], frame[1], 8) if frame else read_header(data)
    if head.width is not None and head.height is not None:
        if head.width == 0 or head.height == 0:
            return DecodedImage(CORRUPT, f"{head.format} header declares {head.width}x{head.height} pixels",
                                head.format, _dim(head.width), _dim(head.height))
        if head.width * head.height > max_pixels:
            return _too_large(head.format, head.width, head.height, max_pixels)
        if frame and _plain_jpeg_decodes(data, *frame):
            mode = "L" if frame[2] == 1 else "RGB"
            return DecodedImage(OK, conversion_note(mode), "JPEG", head.width, head.height, _channels(mode), mode)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return DecodedImage(TOO_LARGE, f"decoder refused the declared size: {e}", head.format)
    except UnidentifiedImageError:
        return DecodedImage(NOT_IMAGE, f"not a recognised image format (first bytes {data[:8]!r})")
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        return _failure(e, head.format, head.width, head.height)
    fmt = im.format or head.format
    mode = im.mode
    w, h = im.size
    if w * h > max_pixels:
        return _too_large(fmt, w, h, max_pixels)
    try:
        if not pixels and fmt == "JPEG":
            im.draft(mode, (max(1, w // 8), max(1, h // 8)))
        im.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, MemoryError) as e:
        return _failure(e, fmt, w, h)
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"first of {frames} frames")
    if head.bit_depth == 16 and fmt == "PNG" and not mode.startswith("I"):
        notes.append(f"16-bit-per-channel PNG read as 8-bit {mode}")
    orientation = _orientation(im)
    if orientation in range(2, 9):
        notes.append(f"EXIF orientation {orientation} applied")
        if orientation >= 5:  # transposed: width and height swap
            w, h = h, w
        if pixels:
            im = ImageOps.exif_transpose(im)
    note = conversion_note(mode)
    if note:
        notes.append(note)
    rgb = to_rgb(im) if pixels else None
    return DecodedImage(OK, "; ".join(notes) or None, fmt, w, h, _channels(mode), mode, rgb)


def _plain_jpeg_decodes(data: bytes, width: int, height: int, layers: int) -> bool:
    """Whether Pillow's JPEG decoder runs through all of a plain JPEG at the validation scale without an error.

    The decoder is called exactly as Image.open + draft + load call it for such a file (same mode, raw
    mode, scale and bytes, in one block), without their Python bookkeeping: every entropy-coded byte is
    parsed all the same. False means "not shown valid": decode then takes the general path, whose
    outcome (and error text) is Pillow's own. Files larger than one read block, above Pillow's
    decompression-bomb warning size, or with LOAD_TRUNCATED_IMAGES set always take the general path.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES or len(data) > ImageFile.MAXBLOCK:
        return False
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return False
    mode = "L" if layers == 1 else "RGB"
    # JpegImageFile.draft(mode, (width // 8, height // 8)): the largest libjpeg scale 1/s that fits.
    fit = min(width // max(1, width // 8), height // max(1, height // 8))
    scale = next((s for s in (8, 4, 2) if fit >= s), 1)
    size = ((width + scale - 1) // scale, (height + scale - 1) // scale)
    try:  # TypeError/AttributeError below: a Pillow whose internal decoder API differs takes the general path
        decoder = Image._getdecoder(mode, "jpeg", (mode, ""), (scale, 0))
        try:
            decoder.setimage(Image.core.new(mode, size), (0, 0, *size))
            consumed, err = decoder.decode(data)
        finally:
            decoder.cleanup()
    except (OSError, ValueError, MemoryError, TypeError, AttributeError):
        return False
    return consumed < 0 and err >= 0  # ImageFile.load's test: the decoder finished, with no error code


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); unreadable EXIF counts as upright, never as a lost image."""
    try:
        value = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError):
        return 1
    return value if isinstance(value, int) else 1


def to_rgb(im: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from any PIL mode (16-bit scaled by 1/257, CMYK/palette/alpha converted)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I"):
        a = np.asarray(im).astype(np.float64)
        scale = 257.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 1.0
        g = np.clip(np.rint(a / scale), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        g = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "1":
        im = im.convert("L")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def conversion_note(mode: str) -> str | None:
    """How to_rgb changes an image of this PIL mode, or None for plain 8-bit RGB."""
    if mode == "RGB":
        return None
    if mode.startswith("I") or mode == "F":
        return f"{_describe(mode)} scaled to 8-bit RGB"
    return f"{_describe(mode)} converted to RGB"


def _describe(mode: str) -> str:
    return {
        "L": "grayscale", "LA": "grayscale with alpha", "1": "bilevel", "P": "palette", "PA": "palette with alpha",
        "RGBA": "RGB with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV",
        "I": "32-bit integer grayscale", "F": "float grayscale",
    }.get(mode, "16-bit grayscale" if mode.startswith("I;16") else f"mode {mode}")


def _channels(mode: str) -> int:
    return {"1": 1, "L": 1, "P": 1, "I": 1, "F": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
            "RGBA": 4, "RGBa": 4, "CMYK": 4}.get(mode, 1 if mode.startswith("I;16") else 3)


MAX_DIMENSION = 2**31 - 1  # the manifest's width/height columns are int32


def _dim(v: int | None) -> int | None:
    """A declared width/height as stored: None when it cannot be a real size (the error text keeps the value)."""
    return v if v is not None and 0 <= v <= MAX_DIMENSION else None


def _too_large(fmt: str | None, w: int, h: int, max_pixels: int) -> DecodedImage:
    return DecodedImage(TOO_LARGE, f"{fmt or 'image'} declares {w}x{h} = {w * h} pixels, "
                        f"above the limit of {max_pixels} (possible decompression bomb); not decoded", fmt, _dim(w),
                        _dim(h))


def _failure(e: BaseException, fmt: str | None, w: int | None, h: int | None) -> DecodedImage:
    msg = " ".join((str(e) or type(e).__name__).split())
    status = TRUNCATED if "truncated" in msg.lower() or isinstance(e, EOFError) else CORRUPT
    what = f"{fmt} " if fmt else ""
    return DecodedImage(status, f"{what}decode failed: {type(e).__name__}: {msg}", fmt, _dim(w), _dim(h))


