#!/usr/bin/env python3
"""Report of architecture searches: Markdown on stdout and report.md, trials.csv, best-so-far
and Pareto plots (PNG) in --out.

    python tools/nas_report.py runs/nas                          # -> runs/nas/report/
    python tools/nas_report.py runs/nas-1worker runs/nas-4workers --out docs/nas

Several studies side by side compare candidates per hour (the first one is the reference, e.g.
1 worker against N). Reads the studies through Optuna; does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from chexnet_hvd import cli  # noqa: E402
from chexnet_hvd.nas import report, study  # noqa: E402


@dataclasses.dataclass
class NasReportConfig:
    studies: list[str] = cli.field(help="study directories (python -m chexnet_hvd.nas --study-dir)")
    storage: str = cli.field("", help="SQLAlchemy URL, for a study not kept in its journal file")
    out: str = cli.field("", help="output directory (default: FIRST_STUDY/report)")
    top: int = cli.field(0, help="rows of the trial table per study, best first (0: all, in order)",
                         minimum=0)


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(NasReportConfig, __doc__, argv, positional=["studies"],
                           prog="python tools/nas_report.py")
    studies = {}
    for path in cfg.studies:
        if not cfg.storage and not Path(path).is_dir():  # opening would create an empty study
            raise cli.InputError(path, "no such directory")
        rows = study.results(study.open_study(path, cfg.storage))
        if not rows:
            raise cli.InputError(path, "the study has no trials yet")
        studies[Path(path).name or path] = rows
    out = cli.make_dir(cfg.out or Path(cfg.studies[0]) / "report")
    text = "# Architecture search\n\n" + report.markdown(studies, cfg.top)
    text += "\n![best so far](best_so_far.png)\n\n![AUROC vs params](pareto.png)\n"
    with cli.output(out / "report.md") as fh:
        fh.write(text)
    report.write_csv(studies, out / "trials.csv")
    report.plot_best_so_far(studies, out / "best_so_far.png")
    report.plot_pareto(studies, out / "pareto.png")
    print(text + f"\nwritten: {out}/report.md, trials.csv, best_so_far.png, pareto.png")
    return 0


if __name__ == "__main__":
    cli.run(main)
