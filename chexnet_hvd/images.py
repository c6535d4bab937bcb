"""Image files (PNG/JPEG of any mode and bit depth, DICOM) -> 8-bit grayscale pixels.

The one conversion of the records writer (chexnet_hvd.records) and of predict; the raw-image
pipeline (chexnet_hvd.data) scales 16-bit PNGs with the same `to_8bit`. CONVERSION names this
conversion: it is part of every shard's reuse key, so a change here rewrites old shards.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CONVERSION = "gray8-v6"  # bump when the pixels or the bytes written for an image change

DEPTHS = (8, 10, 12, 14, 16)  # the grey-level depths detectors and DICOM exports use

DICOM_SUFFIXES = (".dcm", ".dicom")


def to_8bit(values: np.ndarray) -> tuple[np.ndarray, int]:
    """16-bit grey levels -> uint8, scaled by the data's real range: the smallest of DEPTHS that
    holds its maximum, so 12-bit data in a 16-bit PNG (common in DICOM exports) spans 0..255,
    not 0..15, and a darker 12-bit image (maximum 1,800, say) is scaled like its neighbours, by
    4,095. Returns the image and those bits."""
    need = int(values.max()).bit_length() if values.size else 8
    bits = next(d for d in DEPTHS if d >= need)
    return np.round(values.astype(np.float64) * (255 / (2**bits - 1))).astype(np.uint8), bits


def is_dicom_name(path: str | Path) -> bool:
    """Whether a file's name says DICOM (its suffix)."""
    return str(path).lower().endswith(DICOM_SUFFIXES)


def is_dicom(path: str | Path) -> bool:
    """Whether a file is DICOM: by its suffix, or (PACS exports often have none: IM0001) by the
    'DICM' that follows the 128-byte preamble of a DICOM file; a PNG or JPEG by its name is not
    opened to ask."""
    if is_dicom_name(path):
        return True
    if str(path).lower().endswith((".png", ".jpg", ".jpeg")):
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_to_8bit(path: str | Path) -> tuple[np.ndarray, int]:
    """A DICOM's pixels -> uint8 grey levels and its bits stored. The modality transform (rescale
    slope and intercept, or a Modality LUT) is applied, then the range it gives the stored values
    (every value 0..2^bits - 1, or signed) maps linearly onto 0..255 as `to_8bit` maps PNGs, and
    MONOCHROME1 (white = 0) is inverted so that bone is bright like every other image the suite
    reads. Compressed pixel data is decoded by pydicom (RLE) or Pillow (JPEG baseline, JPEG
    2000); JPEG Lossless and JPEG-LS need plugins not installed here (pylibjpeg, GDCM): such a
    file is rejected with pydicom's reason."""
    # Imported here: pydicom takes more than half a second to import and only DICOM sources
    # need it (each spawned records worker would pay it for PNG-only datasets).
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1 or int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise ValueError("not a single-frame grayscale image")
    bits = int(ds.BitsStored)
    low = -(2 ** (bits - 1)) if int(ds.PixelRepresentation) == 1 else 0
    mapped = np.asarray(apply_modality_lut(np.arange(low, low + 2**bits, dtype=np.int64), ds))
    lo, hi = float(mapped.min()), float(mapped.max())
    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    gray = np.round((values - lo) * (255 / max(hi - lo, 1e-12))).clip(0, 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 255 - gray
    return gray, bits


def png_depth(path: str | Path) -> int:
    """A PNG's bit depth from its header (0 for anything else)."""
    with open(path, "rb") as fh:
        head = fh.read(25)
    return head[24] if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def pil_grayscale(path: str | Path) -> tuple[Image.Image, int]:
    """A PNG/JPEG of any mode as an 8-bit grayscale PIL image, and its source bits. 16-bit PNGs
    of every colour type (grey, grey + alpha, RGB, RGBA) are decoded at 16 bits by TensorFlow,
    as the raw pipeline decodes them (Pillow keeps only the high byte of 16-bit colour PNGs)."""
    if png_depth(path) == 16:
        # Imported here: TensorFlow takes seconds to import, and only 16-bit PNGs need it here.
        import tensorflow as tf

        values = tf.io.decode_png(tf.io.read_file(str(path)), channels=1, dtype=tf.uint16)
        gray, bits = to_8bit(values.numpy()[..., 0].astype(np.int64))
        return Image.fromarray(gray), bits
    bits = 8
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            gray, bits = to_8bit(np.asarray(img, dtype=np.int64).clip(0, 65535))
            img = Image.fromarray(gray)
        elif img.mode in ("RGBA", "LA", "PA", "P"):
            # NIH's RGBA images are grey in RGB with an opaque alpha: drop alpha, then to luma.
            img = img.convert("RGBA").convert("RGB")
        return img.convert("L"), bits


def read_grayscale_bits(path: str | Path, size: int | None = None) -> tuple[Image.Image, int]:
    """Any PNG/JPEG (1-bit, L, P, RGB, RGBA, CMYK, 16-bit) or DICOM as an 8-bit grayscale PIL
    image, optionally resized, and the bits of the source's grey levels: the one conversion of
    the records writer and of predict (the raw pipeline applies `to_8bit` the same way)."""
    if is_dicom(path):
        gray, bits = dicom_to_8bit(path)
        img = Image.fromarray(gray)
    else:
        img, bits = pil_grayscale(path)
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return img, bits


def read_grayscale(path: str | Path, size: int | None = None) -> Image.Image:
    """`read_grayscale_bits` without the bits."""
    return read_grayscale_bits(path, size)[0]


PNG_LEVEL = 3  # zlib's: a level that packs more inflates faster (fewer bytes), encodes slower


def encode(gray: Image.Image, encoding: str = "png") -> bytes:
    """A grayscale image as a record stores it: PNG bytes, or (uint8) its raw pixels."""
    pixels = np.asarray(gray, dtype=np.uint8)
    return pixels.tobytes() if encoding == "uint8" else png_up(pixels)


def png_up(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of `pixels` (IHDR, IDAT, IEND: pixels only, no colour profile,
    which libpng would warn about on every read), every row stored with PNG's Up filter (its
    difference from the row above). What decoding costs is what the input pipeline pays on
    every read: an Up row is undone with one vector add, where the rows Pillow's or libpng's
    encoder choose (Paeth, mostly) cost about twice the CPU to decode for about the same bytes
    (the input pipeline's benchmark, 256-px NIH records: decode 431 against 843 us of CPU,
    29.6 against 30.5 kB, against Pillow at zlib level 1). No library here lets the filter be
    chosen, hence the container written here (PNG specification, 3rd ed., 11 and 12.8)."""
    height, width = pixels.shape
    up = np.diff(pixels, axis=0, prepend=np.zeros((1, width), np.uint8))  # uint8: wraps mod 256
    rows = np.hstack([np.full((height, 1), 2, np.uint8), up])  # each row's filter type first (2: Up)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_LEVEL)) + chunk(b"IEND", b""))


def raw_problem(path: str | Path) -> str | None:
    """Why the raw pipeline (TensorFlow's PNG/JPEG decoders) could not read an image file, from
    its header alone; None when it can."""
    if not Path(path).is_file():
        return "missing file"
    if is_dicom(path):
        return "DICOM: the raw pipeline decodes PNG and grey/RGB JPEG only (use --format tfrecord)"
    try:
        with Image.open(path) as img:
            kind, mode = img.format, img.mode
    except Exception as err:  # PIL raises many types for non-images
        return f"unreadable image: {type(err).__name__}: {err}"
    if kind not in ("PNG", "JPEG") or mode == "CMYK":
        return f"{kind} {mode}: the raw pipeline decodes PNG and grey/RGB JPEG only (use --format tfrecord)"
    return None
