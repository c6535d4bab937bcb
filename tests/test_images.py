"""Image conversion (chexnet_hvd.images): every PNG/JPEG mode and bit depth a hospital export
may hold, and DICOMs (generated here; pydicom writes them), become the expected 8-bit grey
pixels in the records, stored as PNGs that hold the pixels and nothing else."""

import io
import shutil
import sys
import zlib

import numpy as np
import pandas as pd
import pydicom
import pytest
import tensorflow as tf
from conftest import module, run
from PIL import Image, ImageCms, ImageFilter, PngImagePlugin
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from chexnet_hvd import data, images, records
from chexnet_hvd.records import writer


def gray(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_dicom(path, stored: np.ndarray, bits: int, photometric="MONOCHROME2", slope=1.0,
                intercept=0.0, signed=False):
    """A single-frame grayscale DICOM (uncompressed, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "p"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def hospital_images(root) -> dict[str, tuple[np.ndarray, int]]:
    """Files of every mode a hospital export may hold -> (expected 8-bit pixels, tolerance)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name, image, expected, tol=0, **kw):
        image.save(root / name, **kw)
        out[name] = (expected, tol)

    g = gray((20, 30), 1)
    save("l.png", Image.fromarray(g), g)
    save("rgb.png", Image.fromarray(np.stack([g] * 3, -1)), g)
    save("rgba.png", Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)])), g)
    save("la.png", Image.fromarray(np.dstack([g, np.full_like(g, 255)]), "LA"), g)
    palette = Image.fromarray(g).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    save("p.png", palette, np.asarray(palette.convert("L")))
    save("bilevel.png", Image.fromarray(g).convert("1"), np.where(np.asarray(Image.fromarray(g).convert("1")), 255, 0))
    v12 = gray((33, 17), 2).astype(np.int64) * 16 + 7  # 12-bit data in a 16-bit PNG
    save("twelve.png", Image.fromarray(v12.astype(np.uint16)), np.round(v12 * 255 / 4095).astype(np.uint8))
    v16 = gray((25, 25), 3).astype(np.uint16) * 257
    save("sixteen.png", Image.fromarray(v16), v16 // 257)
    for name, channels in (("rgb16.png", [v12] * 3), ("la16.png", [v12, np.full_like(v12, 65535)])):
        (root / name).write_bytes(tf.io.encode_png(np.stack(channels, -1).astype(np.uint16)).numpy())
        out[name] = (np.round(v12 * 255 / 4095).astype(np.uint8), 0)  # Pillow alone: 0..15
    g = gray((40, 40), 4) // 4 * 4 + 64  # smooth enough for JPEG: compared within a tolerance
    g = np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(2)))
    save("l.jpg", Image.fromarray(g), g, 6, quality=95)
    save("rgb.jpg", Image.fromarray(np.stack([g] * 3, -1)), g, 6, quality=95)
    save("cmyk.jpg", Image.fromarray(np.stack([g] * 3, -1)).convert("CMYK"), g, 12, quality=95)
    # DICOMs: rescale applied, the stored range mapped onto 0..255, MONOCHROME1 inverted.
    v = gray((24, 24), 5).astype(np.int64) * 16  # 12-bit stored values
    write_dicom(root / "mono2.dcm", v, 12, slope=2.0, intercept=-1000.0)
    out["mono2.dcm"] = (np.round(v * 255 / 4095).astype(np.uint8), 0)
    write_dicom(root / "inverse.dcm", v, 12, slope=-1.0, intercept=4095.0)  # the rescale matters
    out["inverse.dcm"] = (np.round((4095 - v) * 255 / 4095).astype(np.uint8), 0)
    write_dicom(root / "rle.dcm", v, 12)  # a compressed transfer syntax pydicom decodes itself
    ds = pydicom.dcmread(root / "rle.dcm")
    ds.compress(RLELossless)
    ds.save_as(root / "rle.dcm")
    out["rle.dcm"] = (np.round(v * 255 / 4095).astype(np.uint8), 0)
    write_dicom(root / "mono1.dcm", v, 12, photometric="MONOCHROME1")
    out["mono1.dcm"] = (255 - np.round(v * 255 / 4095).astype(np.uint8), 0)
    shutil.copy(root / "mono1.dcm", root / "IM0001")  # a PACS export's name: DICOM by its content
    out["IM0001"] = out["mono1.dcm"]
    s = v * 16 - 32768  # signed 16-bit
    write_dicom(root / "signed.dcm", s, 16, signed=True)
    out["signed.dcm"] = (np.round((s + 32768) * 255 / 65535).astype(np.uint8), 0)
    return out


def stored_images(out) -> dict[str, np.ndarray]:
    """id -> the uint8 pixels a records directory holds (PNG records at the source size)."""
    manifest = records.load_manifest(out)
    pixels = {}
    for shard in (s for split in manifest["splits"].values() for s in split["shards"]):
        for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
            example = records.parse_example(raw, manifest["num_classes"])
            pixels[example["image/id"].numpy().decode()] = data.decode(example).numpy()[..., 0]
    return pixels


@pytest.mark.slow
def test_every_mode_bit_depth_and_dicom_becomes_the_expected_8_bit_image(tmp_path):
    expected = hospital_images(tmp_path / "images")
    pd.DataFrame({"path": list(expected), "patient": range(len(expected)), "Effusion": 0}).to_csv(
        tmp_path / "own.csv", index=False)
    out = tmp_path / "records"
    written = module("records", "--dataset", "csv", "--csv", tmp_path / "own.csv", "--images", tmp_path / "images",
                     "--out", out, "--fractions", 1, 0, 0, "--workers", 1, "--no-progress", check=True)
    pixels = stored_images(out)
    assert sorted(pixels) == sorted(expected)
    for name, (want, tol) in expected.items():
        got = pixels[name].astype(int)
        assert got.shape == want.shape, name
        assert np.abs(got - want.astype(int)).max() <= tol, name
    manifest = records.load_manifest(out)
    assert manifest["source_bit_depths"] == {"8": 9, "12": 8, "16": 2}
    # each image by its own depth: said, with the counts
    assert "warning: source images of several grey-level depths (8 at 12 bits, 2 at 16 bits)" in written.stderr
    # the same files resized into uint8 records: nothing rejected
    module("records", "--dataset", "csv", "--csv", tmp_path / "own.csv", "--images", tmp_path / "images",
           "--out", tmp_path / "small", "--fractions", 1, 0, 0, "--image-size", 16, "--encoding", "uint8",
           "--workers", 1, "--no-progress", check=True)
    assert records.load_manifest(tmp_path / "small")["splits"]["train"]["count"] == len(expected)


def png_chunks(png: bytes) -> list[str]:
    """The chunk types of a PNG file, in order."""
    chunks, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        chunks.append(png[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return chunks


DECODE = """import sys, tensorflow as tf
for i, path in enumerate(sys.argv[1:]):
    print(f"--- {i}", file=sys.stderr, flush=True)
    tf.io.decode_png(tf.io.read_file(path), channels=1)
"""


@pytest.mark.slow
def test_colour_sources_with_an_rgb_icc_profile_give_png_records_without_ancillary_chunks(tmp_path):
    """A colour JPEG or PNG with an embedded RGB ICC profile (and a PNG with text and dpi): the
    grayscale record holds the pixels only, and TensorFlow decodes it without libpng's "iCCP:
    RGB color space not permitted on grayscale PNG" warning (which the old records printed on
    every read; the control below shows the warning is visible in this process)."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    g = gray((24, 20), 9)
    rgb = Image.fromarray(np.stack([g] * 3, -1))
    rgb.save(tmp_path / "a.jpg", icc_profile=icc, quality=95)
    rgb.save(tmp_path / "b.png", icc_profile=icc)
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "scanner")
    Image.fromarray(g).save(tmp_path / "c.png", pnginfo=text, dpi=(300, 300))
    rows = [(name, str(tmp_path / name), "p", [0.0], [1.0], "") for name in ("a.jpg", "b.png", "c.png")]
    job = writer.ShardJob("train", "train-00000-of-00001.tfrecord", rows, None, ("Effusion",))
    assert writer.write_shard(job, str(tmp_path))["count"] == 3
    pngs = [records.parse_example(raw, 1)["image/png"].numpy()
            for raw in tf.data.TFRecordDataset(str(tmp_path / job.file))]
    assert [png_chunks(png) for png in pngs] == [["IHDR", "IDAT", "IEND"]] * 3
    for i, png in enumerate(pngs):
        (tmp_path / f"record{i}.png").write_bytes(png)
    control = io.BytesIO()
    Image.fromarray(g).save(control, format="PNG", icc_profile=icc)  # what the old records held
    (tmp_path / "control.png").write_bytes(control.getvalue())
    proc = run([sys.executable, "-c", DECODE, *(str(tmp_path / f"record{i}.png") for i in range(3)),
                str(tmp_path / "control.png")], env={"TF_CPP_MIN_LOG_LEVEL": "0"}, check=True)
    *ours, old = proc.stderr.split("--- ")[1:]
    assert not any("iCCP" in part or "PNG warning" in part for part in ours), ours
    assert "iCCP" in old


@pytest.mark.parametrize("shape", [(1, 1), (3, 9), (64, 48), (256, 256)])
def test_a_png_record_is_the_pixels_with_every_row_up_filtered(shape):
    """Records' PNGs (images.png_up): TensorFlow and Pillow decode them to the very pixels,
    and every row is stored with the Up filter (type 2), the cheapest to undo."""
    pixels = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    pixels[:, : shape[1] // 2] = np.arange(shape[0], dtype=np.uint8)[:, None]  # smooth half, noisy half
    png = images.png_up(pixels)
    assert np.array_equal(tf.io.decode_png(png).numpy()[..., 0], pixels)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    assert png_chunks(png) == ["IHDR", "IDAT", "IEND"]
    # after the signature (8 bytes), IHDR (25) and IDAT's length and type (8); before its CRC and IEND (16)
    rows = np.frombuffer(zlib.decompress(png[8 + 25 + 8:-16]), np.uint8).reshape(shape[0], shape[1] + 1)
    assert (rows[:, 0] == 2).all()


def test_a_dicom_is_known_by_its_marker_whatever_its_name(tmp_path):
    """PACS exports often have no suffix (IM0001): the 'DICM' after the preamble says DICOM, to
    the conversion, to predict and to the raw pipeline's check (which needs tfrecord for it);
    a PNG is known by its name without being opened."""
    write_dicom(tmp_path / "x.dcm", np.arange(64, dtype=np.int64).reshape(8, 8), 12)
    shutil.copy(tmp_path / "x.dcm", tmp_path / "IM0001")
    (tmp_path / "notes").write_text("x" * 200)
    assert [images.is_dicom(tmp_path / n) for n in ("x.dcm", "IM0001", "notes", "absent.png")] == [True, True, False, False]
    assert images.raw_problem(tmp_path / "IM0001").startswith("DICOM: the raw pipeline decodes PNG")
    np.testing.assert_array_equal(np.asarray(images.read_grayscale(tmp_path / "IM0001")),
                                  np.asarray(images.read_grayscale(tmp_path / "x.dcm")))
