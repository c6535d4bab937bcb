"""Probabilities per pathology for image files, and activation maps (HiResCAM) of the top findings.

    python -m chexnet_hvd.predict scans/ xray.png --checkpoint runs/x/checkpoints/best \
        [--cam heatmaps/] [--format table|csv|json]

Any PNG/JPEG of any size and mode (L, RGB, RGBA, 16-bit) or DICOM is read with the records
writer's grayscale conversion and the training `views.preprocess`. With --cam, each image's --top findings get
an activation map (HiResCAM, the per-location form of Grad-CAM, Selvaraju et al. 2017) of the
class's pre-sigmoid score, overlaid on the image as CheXNet showed its class activation maps:
CAM_DIR/<the image's path relative to the inputs' common folder>_<class>.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from chexnet_hvd import checkpoints, cli, export, images, models, views

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *images.DICOM_SUFFIXES)


@dataclasses.dataclass
class PredictConfig:
    inputs: list[str] = cli.field(help="image files and/or directories of PNG/JPEG/DICOM files")
    checkpoint: str = cli.field(help="checkpoint directory (e.g. RUN_DIR/checkpoints/best)")
    cam: str = cli.field("", help="write activation maps of the top findings to this directory, "
                         "as CAM/<the image's path relative to the inputs' common folder>_<class>.png")
    top: int = cli.field(3, help="findings per image that get a heatmap", minimum=1)
    format: str = cli.field("table", help="output format", choices=["table", "csv", "json"])
    batch_size: int = cli.field(16, help="images per prediction batch", minimum=1)
    backend: str = cli.field("tf", help="inference backend (openvino: --checkpoint is a directory "
                             "written by chexnet_hvd.export)", choices=["tf", "openvino"])


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given, directories expanded to their images (sorted: PNG, JPEG and DICOM by
    name, and DICOMs without a suffix, as PACS exports name them, by content); missing paths
    are errors."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            or (not p.suffix and p.is_file() and images.is_dicom(p)))
        elif item.is_file():
            files.append(item)
        else:
            raise cli.InputError(item, "no such file or directory")
    if not files:
        raise cli.InputError(" ".join(inputs), "no PNG, JPEG or DICOM images found")
    return files


def check_image(path: Path) -> None:
    """A one-line error for anything that is not a readable image (header and checksums only;
    the pixels are decoded later, one batch at a time)."""
    import pydicom

    try:
        if images.is_dicom(path):
            pydicom.dcmread(path, stop_before_pixels=True)
        else:
            with Image.open(path) as img:
                img.verify()
    except Exception as err:  # PIL and pydicom raise many types for non-images
        raise cli.InputError(path, f"not a readable image ({type(err).__name__})") from None


def load_image(path: Path) -> np.ndarray:
    """uint8 [H, W] grayscale, or a one-line error for anything that is not a readable image."""
    try:
        return np.asarray(images.read_grayscale(path))
    except Exception as err:  # PIL raises many types for non-images
        raise cli.InputError(path, f"not a readable image ({type(err).__name__})") from None


def cam_probe(model, layer=None):
    """`model` from its input to [the activation-map layer's maps, the classes' pre-sigmoid
    scores]: the input of the final sigmoid layer `predictions` (models._head). Maps are taken
    from these scores, not the probabilities: at p = 1.0 in float32 the sigmoid's gradient is
    exactly 0, which left a confident model's maps blank."""
    layer = layer or models.cam_layer(model)
    return tf.keras.Model(model.inputs, [layer.output, model.get_layer("predictions").input])


def grad_cam(probe, image: np.ndarray, class_index: int) -> np.ndarray:
    """Class activation map of one preprocessed image [S, S, 3] for one class: the spatial
    layer's maps times the gradient of the class's pre-sigmoid score, summed over channels,
    ReLU, scaled to [0, 1]; [h, w] (all zeros where no location raises the score). Gradients
    are taken per location (HiResCAM, Draelos & Carin 2020), not averaged over space as in
    Grad-CAM: the same map for the backbones' global-pooling heads, and a faithful one for the
    small CNN's flattened head, where Grad-CAM's average blurs where a finding is. `probe`:
    cam_probe(model), built once for many maps."""
    with tf.GradientTape() as tape:
        maps, logits = probe(image[None], training=False)
        score = tf.cast(logits[:, class_index], tf.float32)
    grads = tape.gradient(score, maps)
    cam = tf.nn.relu(tf.reduce_sum(tf.cast(grads * maps, tf.float32), axis=-1))[0].numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a heatmap to an image's [H, W] (smooth: no blocks of map cells)."""
    return tf.image.resize(cam[..., None], shape, method="bilinear").numpy()[..., 0]


def place_map(cam: np.ndarray, shape: tuple[int, int], view: views.View) -> np.ndarray:
    """A heatmap over the model's input, on the image of `shape`: upsampled to the whole image,
    or with --crop to the centre window the model saw (zero outside it)."""
    if not view.crop:
        return upsample(cam, shape)
    top, left, rows, cols = views.window_box(*shape, view.image_size)
    heat = np.zeros(shape, np.float32)
    heat[top:top + rows, left:left + cols] = upsample(cam, (rows, cols))
    return heat


MAX_ALPHA = 0.6  # the opacity of the colour where the map is at its maximum


def overlay(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the grey X-ray [H, W] with the jet colour of `heat` ([0, 1])
    blended in at an opacity proportional to the map's value, so that where the map is 0 the
    pixel is the X-ray's own grey (a fixed opacity tinted the whole image blue)."""
    import matplotlib

    heat = np.clip(heat, 0.0, 1.0)
    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    alpha = MAX_ALPHA * heat[..., None]
    rgb = (1 - alpha) * (gray[..., None] / 255.0) + alpha * colour
    return np.round(rgb * 255).astype(np.uint8)


def save_overlay(gray: np.ndarray, heat: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(overlay(gray, heat))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    with cli.output(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def relative_names(files: list[Path]) -> list[Path]:
    """Each file's path relative to the folder all inputs share, suffix kept: a/x.png and
    b/x.png, or x.png and x.dcm, keep different names."""
    absolute = [Path(os.path.abspath(f)) for f in files]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return [p.relative_to(root) for p in absolute]


def write_maps(probe, name: Path, gray: np.ndarray, x: np.ndarray, view: views.View, row: np.ndarray,
               classes: list[str], top: int, out: Path) -> list[Path]:
    """The activation maps of one image's `top` findings (`x`: its model input, made as `view`
    says), as OUT/<its relative path>_<class>.png; a warning for a map that is all zeros.
    Returns the files written."""
    written = []
    for c in np.argsort(-row)[:top]:
        cam = grad_cam(probe, x, int(c))
        if not cam.any():
            print(f"warning: {name}: the {classes[c]} map is all zeros (no location raises its "
                  "score)", file=sys.stderr)
        path = out / name.parent / f"{name.name}_{classes[c]}.png"
        cli.make_dir(path.parent)
        save_overlay(gray, place_map(cam, gray.shape, view), f"{name}: {classes[c]} {row[c]:.2f}", path)
        written.append(path)
    return written


def render(files: list[Path], probs: np.ndarray, names: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"file": str(f), **{n: round(float(p), 6) for n, p in zip(names, row, strict=True)}}
                           for f, row in zip(files, probs, strict=True)], indent=1)
    if fmt == "csv":  # csv quotes what needs it: a comma or quote in a file's name
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["file", *names])
        writer.writerows([str(f), *(f"{p:.6f}" for p in row)] for f, row in zip(files, probs, strict=True))
        return text.getvalue().rstrip("\n")
    return cli.markdown_table(["file", *names], [[str(f), *(f"{p:.3f}" for p in row)]  # a/x.png, b/x.png
                                                 for f, row in zip(relative_names(files), probs, strict=True)])


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(PredictConfig, __doc__, argv, positional=["inputs"],
                           prog="python -m chexnet_hvd.predict")
    if cfg.cam and cfg.backend != "tf":
        raise cli.InputError("--cam", "activation maps need gradients: use --backend tf")
    files = image_files(cfg.inputs)
    for f in files:  # every file checked before the model is built
        check_image(f)

    if cfg.backend == "tf":  # the model itself, so --cam can take gradients of it
        model, meta = checkpoints.load(cfg.checkpoint)
        predict = model.predict_on_batch
    else:
        predict, meta = export.load_predictor(cfg.checkpoint, cfg.backend)
    names, view = meta["classes"], views.View.of(meta)  # the checkpoint's scaling and crop
    out = Path(cfg.cam) if cfg.cam else None
    if out:
        cli.make_dir(out)
        probe, names_of = cam_probe(model), relative_names(files)
    probs, written = [], set()
    for i in range(0, len(files), cfg.batch_size):  # one batch of images in memory at a time
        chunk = files[i:i + cfg.batch_size]
        images = [load_image(f) for f in chunk]
        inputs = np.stack([views.model_input(img[..., None], view).numpy() for img in images])
        probs.append(np.asarray(predict(inputs), np.float32))
        if out:
            for name, img, x, row in zip(names_of[i:i + cfg.batch_size], images, inputs, probs[-1], strict=True):
                written.update(write_maps(probe, name, img, x, view, row, names, cfg.top, out))
    print(render(files, np.concatenate(probs), names, cfg.format))
    if out:  # an input named twice gets its maps once
        print(f"wrote {len(written)} heatmaps to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
