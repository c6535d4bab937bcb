"""What tools/nas_report.py shows of one or more studies: the GenNAS table (trial, architecture,
AUROC, params, memory, time), best-so-far curves, the AUROC/params Pareto front and candidates
per hour. Pure functions over the rows of `study.results`, plus the two plots."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from chexnet_hvd.cli import markdown_table, output

TABLE_HEAD = ["trial", "architecture", "AUROC", "params", "memory MB", "time s", "proposer", "worker"]


def completed(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["state"] == "complete"]


def best_so_far(rows: Sequence[dict]) -> list[tuple[float, int, float]]:
    """(hours since the study's first start, completed count, best AUROC yet) at each completion."""
    done = sorted(completed(rows), key=lambda r: r["complete"])
    if not done:
        return []
    t0 = min(r["start"] for r in rows if r["start"] is not None)
    out, best = [], float("-inf")
    for n, r in enumerate(done, 1):
        best = max(best, r["auroc"])
        out.append(((r["complete"] - t0) / 3600, n, best))
    return out


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """Completed trials no other beats on both counts (higher AUROC with no more parameters),
    by parameters ascending."""
    front, best = [], float("-inf")
    for r in sorted(completed(rows), key=lambda r: (r["params"], -r["auroc"])):
        if r["auroc"] > best:
            front.append(r)
            best = r["auroc"]
    return front


def throughput(rows: Sequence[dict]) -> dict:
    """Workers seen, candidates completed, wall hours from the first start to the last end, and
    candidates per hour."""
    ends = [r["complete"] for r in rows if r["complete"] is not None]
    starts = [r["start"] for r in rows if r["start"] is not None]
    hours = (max(ends) - min(starts)) / 3600 if ends and starts else 0.0
    n = len(completed(rows))
    return {"workers": len({r["worker"] for r in rows if r["worker"]}), "candidates": n,
            "hours": hours, "per_hour": n / hours if hours else 0.0}


def trial_table(rows: Sequence[dict]) -> str:
    """The GenNAS table of one study, trials in order (failed and running ones say so)."""
    body = []
    for r in sorted(rows, key=lambda r: r["trial"]):
        auroc = f"{r['auroc']:.4f}" if r["auroc"] is not None else r["state"]
        body.append([r["trial"], f"`{r['architecture']}`", auroc, _int(r["params"]),
                     _num(r["memory_mb"], 0), _num(r["seconds"], 1), r["proposer"] or "",
                     r["worker"] or ""])
    return markdown_table(TABLE_HEAD, body)


def throughput_table(studies: dict[str, Sequence[dict]]) -> str:
    """Candidates per hour per study, and each against the first (1 worker vs N workers)."""
    stats = {name: throughput(rows) for name, rows in studies.items()}
    first = next(iter(stats.values()))["per_hour"]
    body = [[name, s["workers"], s["candidates"], f"{s['hours']:.3f}", f"{s['per_hour']:.1f}",
             f"{s['per_hour'] / first:.2f}" if first else "-"] for name, s in stats.items()]
    return markdown_table(["study", "workers", "candidates", "hours", "candidates/hour",
                           "x first"], body)


def markdown(studies: dict[str, Sequence[dict]], top: int = 0) -> str:
    parts = []
    for name, rows in studies.items():
        done = completed(rows)
        best = max(done, key=lambda r: r["auroc"]) if done else None
        shown = sorted(rows, key=lambda r: -(r["auroc"] or -1))[:top] if top else rows
        parts.append(f"## {name}\n\n{len(done)} of {len(rows)} trials completed"
                     + (f"; best `{best['architecture']}` AUROC {best['auroc']:.4f} "
                        f"({_int(best['params'])} params)" if best else "")
                     + ("" if not top else f"; the {top} best shown") + "\n\n" + trial_table(shown))
    parts.append("## Candidates per hour\n\n" + throughput_table(studies))
    return "\n\n".join(parts) + "\n"


def write_csv(studies: dict[str, Sequence[dict]], path: Path) -> None:
    fields = ["study", "trial", "state", "architecture", "code", "auroc", "params", "memory_mb",
              "seconds", "proposer", "worker", "retry_of", "start", "complete", "error"]
    with output(path) as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        for name, rows in studies.items():
            writer.writerows({"study": name, **r} for r in rows)


def plot_best_so_far(studies: dict[str, Sequence[dict]], path: Path) -> None:
    """Best AUROC so far against wall time (left) and against completed trials (right)."""
    plt = _pyplot()
    fig, (by_time, by_trial) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, rows in studies.items():
        points = best_so_far(rows)
        if points:
            hours, n, best = zip(*points, strict=True)
            by_time.step([h * 60 for h in hours], best, where="post", marker=".", label=name)
            by_trial.step(n, best, where="post", marker=".", label=name)
    by_time.set(xlabel="wall time (minutes)", ylabel="best mean validation AUROC so far")
    by_trial.set(xlabel="completed trials")
    by_trial.xaxis.get_major_locator().set_params(integer=True)
    for ax in (by_time, by_trial):
        ax.grid(alpha=0.3)
    by_trial.legend()
    fig.tight_layout()
    with output(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def plot_pareto(studies: dict[str, Sequence[dict]], path: Path) -> None:
    """AUROC against trainable parameters, every completed trial, and the Pareto front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = [r for group in studies.values() for r in completed(group)]
    ax.scatter([r["params"] / 1e6 for r in rows], [r["auroc"] for r in rows], s=18, alpha=0.6,
               label="candidates")
    front = pareto_front(rows)
    ax.step([r["params"] / 1e6 for r in front], [r["auroc"] for r in front], where="post",
            color="C3", marker="o", label="Pareto front")
    for r in front:
        ax.annotate(r["architecture"], (r["params"] / 1e6, r["auroc"]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")
    ax.set(xlabel="trainable parameters (millions)", ylabel="mean validation AUROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with output(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _int(value) -> str:
    return f"{value:,}" if value is not None else "-"


def _num(value, digits: int) -> str:
    return f"{value:,.{digits}f}" if value is not None else "-"
