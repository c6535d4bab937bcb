#!/usr/bin/env python3
"""Scaling tables from training run logs: Markdown on stdout, optional CSV and PNG plot.

    python tools/scaling_report.py runs/np1 runs/np2 --csv scaling.csv --plot scaling.png
    python tools/scaling_report.py 'runs/*' --baseline docs/dell_v100_baseline.csv
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from chexnet_hvd import cli, scaling  # noqa: E402
from chexnet_hvd.runlog import RunLogError  # noqa: E402


@dataclasses.dataclass
class ReportConfig:
    runs: list[str] = cli.field(help="run directories, runlog.jsonl files or globs")
    csv: str = cli.field("", help="also write the table as CSV here")
    plot: str = cli.field("", help="also write a PNG plot (throughput, efficiency vs ranks) here")
    baseline: str = cli.field("", help="reference CSV (columns ranks,images_per_sec) shown beside ours")
    skip_epochs: int = cli.field(1, help="leading epochs per run left out (warm-up)")


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(ReportConfig, __doc__.splitlines()[0], argv, positional=["runs"])
    try:
        runs = [scaling.load_run(p) for p in scaling.find_runlogs(cfg.runs)]
        rows = scaling.scaling_rows(runs, cfg.skip_epochs)
        if not rows:
            raise RunLogError(f"{' '.join(cfg.runs)}: no finished epochs in the run logs")
        if cfg.baseline:
            rows = scaling.add_baseline(rows, scaling.read_baseline(cfg.baseline))
    except RunLogError as err:
        where, _, what = str(err).partition(": ")
        raise cli.InputError(where, what) from None
    print(scaling.markdown(rows))
    if cfg.csv:
        scaling.write_csv(rows, cfg.csv)
    if cfg.plot:
        scaling.plot(rows, cfg.plot)
    return 0


if __name__ == "__main__":
    cli.run(main)
