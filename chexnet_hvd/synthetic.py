"""Chest-X-ray-like synthetic images with planted, learnable findings (tests and the demo).

`python -m chexnet_hvd.synthetic --out DIR --images N --size S --seed K` writes DIR/images/*.png
(8-bit grayscale), DIR/Data_Entry_2017.csv in the NIH v2020 column layout, and DIR/planted.csv
(where each finding was drawn, for Grad-CAM checks). Each pathology has its own place in the
lungs, its own shape and its own polarity (opacity brighter, lucency darker), so a small network
learns it and a permuted label mapping shows up as chance-level AUROC for the permuted classes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from chexnet_hvd import cli
from chexnet_hvd.labels import NUM_CLASSES, PATHOLOGIES, format_finding_labels

# Percent of NIH images with each finding (Wang et al. 2017, CheXNet-DDP report), floored at
# 1.5% so that a few-thousand-image set still has positives of the rarest class in every split.
NIH_PREVALENCE = np.array([10.3, 2.5, 11.9, 17.7, 5.2, 5.6, 1.3, 4.7, 4.2, 2.1, 2.2, 1.5, 3.0, 0.2]) / 100
PREVALENCE = np.maximum(NIH_PREVALENCE, 0.015)
SHAPES = ("disc", "ring", "hbar", "vbar", "square", "cross", "diag")
CSV_COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]",
]


@dataclasses.dataclass
class SyntheticConfig:
    out: str = cli.field(help="output directory (images/, Data_Entry_2017.csv, planted.csv)")
    images: int = cli.field(2000, help="number of images", minimum=1)
    size: int = cli.field(64, help="image side in pixels", minimum=16)
    seed: int = cli.field(0, help="random seed (same seed, same bytes)", minimum=0)
    mean_images_per_patient: float = cli.field(3.6, help="NIH has 112,120 images of 30,805 patients",
                                               minimum=1)


def finding_sites(size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) in pixels for each pathology: 14 cells of a 4x4 grid over the lung field."""
    cells = [(r, c) for r in range(4) for c in range(4) if (r, c) not in ((0, 0), (0, 3))]
    step, margin = size * 0.8 / 4, size * 0.1
    return [(margin + (c + 0.5) * step, margin + (r + 0.5) * step, step * 0.32) for r, c in cells]


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Soft 0..1 mask of one planted shape, on pixel offsets from its centre."""
    dist = np.hypot(dx, dy)
    thick = max(r * 0.35, 1.0)
    masks = {
        "disc": dist <= r,
        "ring": np.abs(dist - r * 0.8) <= thick * 0.6,
        "hbar": (np.abs(dy) <= thick * 0.7) & (np.abs(dx) <= r),
        "vbar": (np.abs(dx) <= thick * 0.7) & (np.abs(dy) <= r),
        "square": (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8),
        "cross": ((np.abs(dx) <= thick * 0.5) | (np.abs(dy) <= thick * 0.5)) & (dist <= r),
        "diag": (np.abs(dx - dy) <= thick * 0.8) & (dist <= r),
    }
    return masks[shape].astype(np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A chest-like field: dark air, bright body, two darker lungs, ribs, smooth variation, noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((x - 0.5) / 0.46) ** 2 + ((y - 0.55) / 0.5) ** 2 <= 1
    img = np.where(body, 0.62, 0.12).astype(np.float32)
    for cx in (0.32, 0.68):
        lung = ((x - cx + rng.normal(0, 0.01)) / 0.16) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1
        img = np.where(lung, 0.32, img)
    img += 0.04 * np.sin(2 * np.pi * (y * rng.uniform(7, 9) + 0.3 * np.abs(x - 0.5)))
    low = rng.normal(0, 1, (4, 4)).astype(np.float32)
    img += 0.05 * np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC))
    img *= rng.uniform(0.85, 1.15)
    return img + rng.normal(0, 0.03, img.shape).astype(np.float32)


def render(rng: np.random.Generator, size: int, labels: np.ndarray) -> tuple[np.ndarray, list]:
    """One uint8 image with the findings in `labels` planted; returns it and the planted sites."""
    img = background(rng, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    planted = []
    for k, (cx, cy, r) in enumerate(finding_sites(size)):
        if labels[k] < 0.5:
            continue
        jx, jy = rng.uniform(-0.15, 0.15, 2) * r
        sign = 1.0 if k < len(SHAPES) else -1.0  # first 7 opacities, last 7 lucencies
        amplitude = sign * rng.uniform(0.22, 0.35)
        img += amplitude * shape_mask(SHAPES[k % len(SHAPES)], x - cx - jx, y - cy - jy, r)
        planted.append((k, cx + jx, cy + jy, r))
    return np.clip(img * 255, 0, 255).astype(np.uint8), planted


def draw_labels(rng: np.random.Generator, n_images: int, mean_per_patient: float) -> pd.DataFrame:
    """Patients with several follow-ups; a patient's persistent findings recur across follow-ups."""
    rows, patient = [], 0
    while len(rows) < n_images:
        patient += 1
        follow_ups = min(1 + rng.poisson(mean_per_patient - 1), n_images - len(rows))
        persistent = rng.random(NUM_CLASSES) < PREVALENCE / 2
        age, gender = int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))
        for f in range(follow_ups):
            labels = persistent | (rng.random(NUM_CLASSES) < PREVALENCE / 2)
            rows.append((patient, f, age + f // 3, gender, str(rng.choice(["PA", "AP"])), labels))
    return pd.DataFrame(rows, columns=["patient", "follow_up", "age", "gender", "view", "labels"])


def generate(cfg: SyntheticConfig) -> pd.DataFrame:
    """Write the image set; the CSV goes last (temp + rename), so its presence means complete."""
    cli.check_values(cfg)  # the CLI checked them; a config built in code is checked here
    out = Path(cfg.out)
    cli.make_dir(out / "images")
    rng = np.random.default_rng(cfg.seed)
    table = draw_labels(rng, cfg.images, cfg.mean_images_per_patient)
    entries, planted_rows = [], []
    for row in tqdm(table.itertuples(), total=len(table), desc="synthetic", unit="img",
                    disable=None):
        name = f"{row.patient:08d}_{row.follow_up:03d}.png"
        pixels, planted = render(rng, cfg.size, row.labels)
        Image.fromarray(pixels, mode="L").save(out / "images" / name)
        entries.append((name, format_finding_labels(row.labels), row.follow_up, row.patient,
                        row.age, row.gender, row.view, cfg.size, cfg.size, 0.143, 0.143))
        planted_rows += [(name, PATHOLOGIES[k], cx, cy, r) for k, cx, cy, r in planted]
    pd.DataFrame(planted_rows, columns=["Image Index", "Pathology", "cx", "cy", "r"]).to_csv(
        out / "planted.csv", index=False)
    entry = pd.DataFrame(entries, columns=CSV_COLUMNS)
    tmp = out / "Data_Entry_2017.csv.tmp"
    entry.to_csv(tmp, index=False)
    os.replace(tmp, out / "Data_Entry_2017.csv")
    return entry


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(SyntheticConfig, __doc__, argv, prog="python -m chexnet_hvd.synthetic")
    entry = generate(cfg)
    print(f"wrote {len(entry)} images of {entry['Patient ID'].nunique()} patients to {cfg.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
