#!/usr/bin/env python3
"""Per-split dataset statistics: images, patients and percent positive per pathology.

    python tools/dataset_stats.py --csv data/nih/Data_Entry_2017_v2020.csv --split official
    python tools/dataset_stats.py --dataset chexpert --csv CheXpert-v1.0-small/train.csv --out stats

The split is the one the records writer would make with the same flags (seeded, by patient,
leak-checked). Prints a Markdown table; with --out, also writes OUT.md and OUT.csv.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from chexnet_hvd import cli, sources  # noqa: E402


@dataclasses.dataclass(kw_only=True)
class StatsConfig(sources.TableConfig):
    out: str = cli.field("", help="also write the table to OUT.md and OUT.csv")


def render(stats) -> str:
    """Counts as integers, prevalences as percentages."""
    rows = [[name, *(f"{v:,.0f}" if name in ("images", "patients") else f"{v:.2f}%" for v in values)]
            for name, values in zip(stats.index, stats.to_numpy(), strict=True)]
    return cli.markdown_table(["", *stats.columns], rows)


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(StatsConfig, __doc__, argv, prog="python tools/dataset_stats.py")
    stats = sources.prevalence(sources.load_table(cfg))
    text = render(stats)
    print(text)
    if cfg.out:
        cli.make_dir(Path(cfg.out).parent)
        with cli.output(cfg.out + ".md") as fh:
            fh.write(text + "\n")
        with cli.output(cfg.out + ".csv") as fh:
            stats.to_csv(fh, index_label="row")
    return 0


if __name__ == "__main__":
    cli.run(main)
