"""Export a checkpoint for inference: a TensorFlow SavedModel, or an OpenVINO IR in FP32 or INT8.

    python -m chexnet_hvd.export --checkpoint runs/x/checkpoints/best --format savedmodel
    python -m chexnet_hvd.export --checkpoint CKPT --format openvino --precision fp32
    python -m chexnet_hvd.export --checkpoint CKPT --format openvino --precision int8 --calib RECORDS

The output directory (default RUN_DIR/export-FORMAT-PRECISION, beside RUN_DIR/checkpoints; an
existing folder is replaced only if it is an earlier export) holds the model and a meta.json
(model, image size, input scaling and crop, classes), written under a temporary name and renamed
when complete; evaluate and predict read it with --backend openvino. INT8 is NNCF post-training quantisation calibrated
on --calib-images preprocessed training images. OpenVINO runs the models with the inference
precision hint f32, so FP32 really is fp32 on CPUs with AMX (which would otherwise run bf16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from chexnet_hvd import checkpoints, cli, data, records, views

OV_MODEL = "model.xml"
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclasses.dataclass
class ExportConfig:
    checkpoint: str = cli.field(help="checkpoint directory (e.g. RUN_DIR/checkpoints/best)")
    format: str = cli.field("openvino", help="what to write", choices=["savedmodel", "openvino"])
    precision: str = cli.field("fp32", help="openvino: fp32, or int8 by post-training quantisation",
                               choices=["fp32", "int8"])
    calib: str = cli.field("", help="int8: records directory whose training split calibrates")
    calib_images: int = cli.field(300, help="int8: calibration images", minimum=1)
    out: str = cli.field("", help="output directory (default: RUN_DIR/export-FORMAT[-PRECISION] "
                         "for RUN_DIR/checkpoints/NAME); an existing one only if an earlier export")


def save_savedmodel(model, path: Path) -> None:
    """The Keras model as a SavedModel with one float32 [N, S, S, 3] -> [N, C] signature."""
    size = model.input_shape[1]
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="image")
    serve = tf.function(lambda image: {"probabilities": model(image, training=False)}, input_signature=[spec])
    tf.saved_model.save(model, str(path), signatures={"serving_default": serve})


def calibration_images(records_dir: str, view: views.View, count: int) -> list[np.ndarray]:
    """The first `count` training images, preprocessed as for the model, one [1, S, S, 3] each."""

    out = []
    for batch in data.eval_dataset(records_dir, "train", view, 32):
        out += [img[None] for img in batch["image"].numpy()]
        if len(out) >= count:
            break
    return out[:count]


def check_flags(cfg: ExportConfig) -> None:
    """int8 is OpenVINO's and needs --calib; --calib serves int8 alone (not silently ignored)."""
    int8 = cfg.precision == "int8"
    if int8 and cfg.format != "openvino":
        raise cli.InputError("--precision", "int8 is an OpenVINO export's: add --format openvino")
    if int8 and not cfg.calib:
        raise cli.InputError("--calib", "int8 needs a records directory to calibrate on")
    if cfg.calib and not int8:
        raise cli.InputError("--calib", "only an int8 export calibrates: add --precision int8, or drop --calib")


def output_dir(cfg: ExportConfig) -> Path:
    """--out, else RUN_DIR/export-FORMAT[-PRECISION] beside the run's checkpoints. What is there
    already is replaced only when it is an export (its meta.json names a format) or empty: any
    other folder named by mistake is refused, never deleted."""
    tag = "savedmodel" if cfg.format == "savedmodel" else f"openvino-{cfg.precision}"
    # abspath, not resolve: a checkpoints folder linked to scratch still exports into RUN_DIR
    out = Path(os.path.abspath(cfg.out or Path(cfg.checkpoint).parent.parent / f"export-{tag}"))
    if out.exists() and not out.is_dir():
        raise cli.InputError(out, "exists and is not a folder: give --out a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and "format" not in (checkpoints.read_meta(out) or {}):
        raise cli.InputError(out, "exists and is not an export (no meta.json naming a format): "
                             "give --out a new or empty folder, or an earlier export to replace")
    return out


def export(cfg: ExportConfig) -> Path:
    check_flags(cfg)
    out = output_dir(cfg)
    model, meta = checkpoints.load(cfg.checkpoint)
    if cfg.calib:  # a clear error now rather than after the conversion
        data.check_view(records.load_manifest(cfg.calib), cfg.calib, views.View.of(meta))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cli.make_dir(tmp)
    with cli.writing(tmp, out, "the export", records.write_errors()):  # a full disk: one line
        write_export(cfg, model, meta, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_export(cfg: ExportConfig, model, meta: dict, tmp: Path) -> None:
    """The exported model and its meta.json, into the folder `tmp`."""
    save_savedmodel(model, tmp / "savedmodel")
    if cfg.format == "openvino":
        import openvino as ov

        ov_model = ov.convert_model(str(tmp / "savedmodel"))
        if cfg.precision == "int8":
            import nncf

            calib = calibration_images(cfg.calib, views.View.of(meta), cfg.calib_images)
            ov_model = nncf.quantize(ov_model, nncf.Dataset(calib), subset_size=len(calib))
        ov.save_model(ov_model, str(tmp / OV_MODEL), compress_to_fp16=False)
        shutil.rmtree(tmp / "savedmodel")
    keep = ("model", "image_size", "scaling", "crop", "classes", "num_classes", "val_mean_auroc",
            "train_signature")  # evaluate's default output tells the run's records from others
    (tmp / "meta.json").write_text(json.dumps({k: meta.get(k) for k in keep} | {
        "format": cfg.format, "precision": cfg.precision if cfg.format == "openvino" else "fp32",
        "checkpoint": str(cfg.checkpoint)}, indent=1))


def load_predictor(path: str | Path, backend: str):
    """(predict, meta): predict maps a float32 [N, S, S, 3] batch to [N, C] probabilities.
    backend tf: a training checkpoint; openvino: a directory written by --format openvino."""

    if backend == "tf":
        model, meta = checkpoints.load(path)
        return (lambda x: np.asarray(model.predict_on_batch(x), np.float32)), meta
    meta_path, xml = Path(path) / "meta.json", Path(path) / OV_MODEL
    if not xml.is_file() or not meta_path.is_file():
        raise cli.InputError(path, f"not an OpenVINO export (no {OV_MODEL} + meta.json; write one with "
                             "python -m chexnet_hvd.export --format openvino)")
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", OV_CONFIG)
    return (lambda x: np.asarray(compiled(np.asarray(x, np.float32))[0], np.float32)), json.loads(meta_path.read_text())


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(ExportConfig, __doc__, argv, prog="python -m chexnet_hvd.export")
    out = export(cfg)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
