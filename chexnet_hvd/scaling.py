"""Scaling tables from run logs: group runs, aggregate epochs, speedup and efficiency.

Pure functions over `chexnet_hvd.runlog` records; no TensorFlow. Speedup is global img/s over a
1-rank run's of the same group; efficiency is speedup / ranks, i.e. weak scaling with a fixed
per-rank batch, as in NVIDIA's and Horovod's tables. A group without a 1-rank run has neither
(taking its smallest run as the base would call that run's own scaling perfect). Runs of one
global batch split over several world sizes also get strong-scaling speedup and efficiency
(over the 1-rank run at that batch). Each row carries its epochs' bottleneck verdict
(`chexnet_hvd.bottleneck`) with the numbers behind it, and the time an epoch of NIH's training
split would take at its rate.
"""

from __future__ import annotations

import csv
import glob
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chexnet_hvd import cli, runlog

# Every setting that changes throughput: runs differing in one of them never pool.
GROUP_KEYS = ("model", "image_size", "precision", "local_batch", "input", "preprocess", "xla",
              "fp16_allreduce", "backward_passes", "steps_per_call", "backend", "engine")
COLUMNS = [*GROUP_KEYS, "ranks", "global_batch", "images_per_sec", "images_per_sec_per_rank", "speedup",
           "efficiency", "strong_speedup", "strong_efficiency", "epoch_seconds_mean", "epoch_seconds_sd",
           "nih_epoch_seconds", "bottleneck", "step_ms", "compute_ms", "communication_ms", "input_empty",
           "epochs", "runs"]
# The NIH official split's training images (train_val_list.txt less the validation patients the
# suite carves out): what one epoch of the time-per-NIH-epoch columns covers.
NIH_TRAIN_IMAGES = 77_707


def settings(start: dict) -> dict:
    """A start record's values of GROUP_KEYS (older logs lack some: their defaults)."""
    config = start.get("config", {})
    return {"model": start.get("model"), "image_size": start.get("image_size"),
            "precision": start.get("precision"), "local_batch": start.get("local_batch"),
            "input": "synthetic" if start.get("synthetic_input") else "records",
            "preprocess": start.get("preprocess", "input pipeline"),
            "xla": bool(config.get("xla", False)),
            "fp16_allreduce": bool(config.get("fp16_allreduce", False)),
            "backward_passes": int(config.get("backward_passes_per_step", 1)),
            "steps_per_call": int(config.get("steps_per_execution", 1)),
            "backend": start.get("backend", start.get("horovod_backend")), "engine": start.get("engine", "horovod")}


@dataclass
class Run:
    """One attempt of a run: a start record and the epochs it trained (a resumed run directory
    holds one attempt per start, each with its own world size and settings)."""

    path: str
    start: dict
    epochs: list[dict] = field(default_factory=list)
    status: str | None = None
    unreadable: list[int] = field(default_factory=list)  # its log's lines skipped (torn writes)

    @property
    def key(self) -> tuple:
        return tuple(settings(self.start).values())


def find_runlogs(patterns: list[str]) -> list[Path]:
    """Run logs named by run directories, files or globs; searched recursively in directories."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for match in map(Path, matches):
            if match.is_file():
                found.append(match)
            elif match.is_dir():
                found += sorted(match.rglob(runlog.FILENAME))
            else:
                raise runlog.RunLogError(f"{match}: no such file or directory")
    if not found:
        raise runlog.RunLogError(f"{' '.join(patterns)}: no {runlog.FILENAME} found")
    return sorted(set(found))


def load_runs(path: Path) -> list[Run]:
    """The attempts of one run log, each epoch credited to the start before it."""
    attempts: list[Run] = []
    records, unreadable = runlog.read_records(path)
    for record in records:
        if record["event"] == "start":
            attempts.append(Run(str(path), record, unreadable=unreadable))
        elif not attempts:
            continue  # an older trainer logged the end of a run that failed before starting
        elif record["event"] == "epoch":
            attempts[-1].epochs.append(record)
        elif not record.get("before_start"):  # (an attempt stalled before its start: not this one's)
            attempts[-1].status = record["status"]
    if not attempts:
        raise runlog.RunLogError(f"{path}: no start record")
    return attempts


def load_all(paths: list[Path]) -> list[Run]:
    return [run for path in paths for run in load_runs(path)]


def timed_epochs(epochs: list[dict], skip_first: int) -> list[dict]:
    """Epochs that count for throughput: those that trained (a resume can leave an epoch no step,
    logged without img/s), of them the first `skip_first` (graph building, cold caches) left out
    when there are more than that."""
    epochs = [e for e in epochs if e["images_per_sec"]]
    return epochs[skip_first:] if len(epochs) > skip_first else epochs


BACKEND = GROUP_KEYS.index("backend")


def group_of(run: Run, runs: list[Run]) -> tuple:
    """A run's group. One rank moves no gradients, so its transport does not change throughput:
    a 1-rank run joins the multi-rank runs that differ from it in the backend alone (a lone
    Horovod process reports mpi, its horovodrun --gloo siblings gloo), when they agree on one."""
    def rest(key: tuple) -> tuple:
        return key[:BACKEND] + key[BACKEND + 1:]

    if run.start["world_size"] == 1:
        backends = {r.key[BACKEND] for r in runs if r.start["world_size"] > 1 and rest(r.key) == rest(run.key)}
        if len(backends) == 1:
            return run.key[:BACKEND] + (backends.pop(),) + run.key[BACKEND + 1:]
    return run.key


def scaling_rows(runs: list[Run], skip_first_epochs: int = 1) -> list[dict]:
    """One row per (group, world size), sorted; runs of the same size are pooled by epoch."""
    cells: dict[tuple, list[dict]] = {}
    counts: dict[tuple, int] = {}
    for run in runs:
        epochs = timed_epochs(run.epochs, skip_first_epochs)
        if not epochs:
            continue
        cell = group_of(run, runs) + (run.start["world_size"],)
        cells.setdefault(cell, []).extend(epochs)
        counts[cell] = counts.get(cell, 0) + 1
    rows = []
    for cell in sorted(cells, key=lambda c: tuple(str(x) for x in c[:-1]) + (c[-1],)):
        epochs = cells[cell]
        ips = statistics.mean(e["images_per_sec"] for e in epochs)
        secs = [e["seconds"] for e in epochs]
        group = dict(zip(GROUP_KEYS, cell[:-1], strict=True))
        rows.append(group | {
            "ranks": cell[-1], "global_batch": group["local_batch"] * cell[-1], "images_per_sec": ips,
            "images_per_sec_per_rank": ips / cell[-1], "epoch_seconds_mean": statistics.mean(secs),
            "epoch_seconds_sd": statistics.stdev(secs) if len(secs) > 1 else 0.0,
            "nih_epoch_seconds": NIH_TRAIN_IMAGES / ips, "epochs": len(epochs), "runs": counts[cell]}
            | diagnosis(epochs))
    add_speedup(rows, weak_key, "speedup", "efficiency", sizes=1)
    add_speedup(rows, strong_key, "strong_speedup", "strong_efficiency", sizes=2)
    return rows


def weak_key(row: dict) -> tuple:
    """Rows of one weak-scaling series: every setting equal, the per-rank batch included."""
    return tuple(row[k] for k in GROUP_KEYS)


def strong_key(row: dict) -> tuple:
    """Rows of one strong-scaling series: the same global batch split over the world sizes, every
    other setting equal (the transport aside: one rank moves no gradients)."""
    return tuple(row[k] for k in GROUP_KEYS if k not in ("local_batch", "backend")) + (row["global_batch"],)


def add_speedup(rows: list[dict], key, speedup: str, efficiency: str, sizes: int) -> None:
    """Speedup (img/s over the series' 1-rank row's) and efficiency (speedup / ranks) for each
    series of `key` with a 1-rank row and at least `sizes` world sizes; None elsewhere."""
    for series in {key(r) for r in rows}:
        members = [r for r in rows if key(r) == series]
        base = next((r["images_per_sec"] for r in members if r["ranks"] == 1), None)
        scaled = base and len({r["ranks"] for r in members}) >= sizes
        for r in members:
            r[speedup] = r["images_per_sec"] / base if scaled else None
            r[efficiency] = r[speedup] / r["ranks"] if scaled else None


def diagnosis(epochs: list[dict]) -> dict:
    """What held a row's epochs back: the most frequent bottleneck verdict among the epochs
    that carry one (the latest of a tie), with the medians of its epochs' step, compute
    (slowest rank) and communication times and input-empty fraction (worst rank). Empty when
    no epoch carries one (an older trainer's log)."""
    judged = [e for e in epochs if e.get("bottleneck")]
    if not judged:
        return {}
    counts = Counter(e["bottleneck"] for e in judged)
    found = next(e["bottleneck"] for e in reversed(judged) if counts[e["bottleneck"]] == max(counts.values()))
    mine = [e for e in judged if e["bottleneck"] == found]

    def median(value) -> float:
        return statistics.median(value(e) for e in mine)

    return {"bottleneck": found, "step_ms": median(lambda e: e["step_seconds"]) * 1e3,
            "compute_ms": median(lambda e: max(e["compute_seconds"])) * 1e3,
            "communication_ms": median(lambda e: e["communication_seconds"]) * 1e3,
            "input_empty": median(lambda e: max(e["input_starved"]))}


def read_baseline(path: str | Path) -> dict[int, float]:
    """A reference table: CSV with columns `ranks` and `images_per_sec`."""
    path = Path(path)
    if not path.is_file():
        raise runlog.RunLogError(f"{path}: no such file")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ranks", "images_per_sec"} <= set(reader.fieldnames):
            raise runlog.RunLogError(f"{path}: baseline needs columns ranks,images_per_sec")
        try:
            return {int(r["ranks"]): float(r["images_per_sec"]) for r in reader}
        except ValueError as err:
            raise runlog.RunLogError(f"{path}: {err}") from None


def add_baseline(rows: list[dict], baseline: dict[int, float]) -> list[dict]:
    """Put the reference img/s and our ratio to it beside each row (None where it has no entry)."""
    for r in rows:
        ref = baseline.get(r["ranks"])
        r["baseline_images_per_sec"] = ref
        r["ratio_to_baseline"] = r["images_per_sec"] / ref if ref else None
    return rows


def fmt(value, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{value * 100:.0f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# A table holds the runs of one job: the same settings but for the engine and its transport,
# which are a column, so the engines are compared row by row at each world size.
ENGINE_KEYS = ("engine", "backend")
TABLE_KEYS = tuple(k for k in GROUP_KEYS if k not in ENGINE_KEYS)


def transport(row: dict) -> str:
    """The engine and its transport in one word, e.g. horovod/gloo, tf/ring."""
    return row["engine"] + (f"/{row['backend']}" if row["backend"] else "")


def title(group: dict, batch: str = "") -> str:
    """A job in words: model, size, precision, batch (`batch`, else the per-rank batch), input,
    then what is switched on."""
    batch = batch or f"batch {group['local_batch']} per rank"
    text = f"{group['model']}, {group['image_size']} px, {group['precision']}, {batch}, {group['input']} input"
    switched = (("preprocessed in the model graph", group["preprocess"] == "model graph"),
                ("XLA", group["xla"]), ("fp16 allreduce", group["fp16_allreduce"]),
                (f"{group['backward_passes']} backward passes per step", group["backward_passes"] > 1),
                (f"{group['steps_per_call']} steps per call", group["steps_per_call"] > 1))
    return text + "".join(f", {name}" for name, on in switched if on)


def markdown(rows: list[dict]) -> str:
    """One Markdown table per job, a row per world size and engine; with more than one engine
    (or transport) in a table, each row's img/s over the first one's at the same world size. An
    engine without a 1-rank run has "-" for speedup and efficiency, and a note says so. Then a
    table per strong-scaling series (`strong_markdown`)."""
    out = []
    jobs = sorted({tuple(r[k] for k in TABLE_KEYS) for r in rows}, key=lambda g: tuple(map(str, g)))
    has_base = any("baseline_images_per_sec" in r for r in rows)
    for job in jobs:
        members = sorted((r for r in rows if tuple(r[k] for k in TABLE_KEYS) == job),
                         key=lambda r: (r["ranks"], transport(r)))
        engines = sorted({transport(r) for r in members})
        reference = {r["ranks"]: r["images_per_sec"] for r in members if transport(r) == engines[0]}
        out.append(f"### {title(dict(zip(TABLE_KEYS, job, strict=True)))}\n")
        head = ["ranks", "engine", "img/s", "img/s per rank", "speedup", "efficiency", "epoch s (mean ± sd)"]
        if len(engines) > 1:
            head.append(f"img/s / {engines[0]}'s")
        if has_base:
            head += ["baseline img/s", "ours / baseline"]
        head.append("NIH epoch")
        judged = any(r.get("bottleneck") for r in members)
        if judged:
            head += ["bottleneck", "step / compute / communication ms, input empty"]
        body = []
        for r in members:
            cells = [str(r["ranks"]), transport(r), fmt(r["images_per_sec"]), fmt(r["images_per_sec_per_rank"]),
                     fmt(r["speedup"], 2), fmt(r["efficiency"], percent=True),
                     f"{r['epoch_seconds_mean']:.1f} ± {r['epoch_seconds_sd']:.1f}"]
            if len(engines) > 1:
                ref = reference.get(r["ranks"])
                cells.append(fmt(r["images_per_sec"] / ref if ref else None, 2))
            if has_base:
                cells += [fmt(r.get("baseline_images_per_sec")), fmt(r.get("ratio_to_baseline"), 2)]
            cells.append(duration(r["nih_epoch_seconds"]))
            if judged:
                cells += [r.get("bottleneck", "-"), numbers_behind(r)]
            body.append(cells)
        out.append(cli.markdown_table(head, body))
        out += [no_base_note(members), ""] if any(r["speedup"] is None for r in members) else [""]
    return "\n".join(out + strong_markdown(rows))


def numbers_behind(row: dict) -> str:
    """A row's verdict numbers in one cell: step / compute / communication ms, input empty."""
    if not row.get("bottleneck"):
        return "-"
    return (f"{row['step_ms']:.1f} / {row['compute_ms']:.1f} / {row['communication_ms']:.1f}, "
            f"{row['input_empty']:.0%}")


def strong_markdown(rows: list[dict]) -> list[str]:
    """A table per strong-scaling series: one global batch split over the world sizes."""
    out = []
    series = sorted({strong_key(r) for r in rows if r["strong_speedup"] is not None},
                    key=lambda k: tuple(map(str, k)))
    for key in series:
        members = sorted((r for r in rows if strong_key(r) == key), key=lambda r: (r["ranks"], transport(r)))
        batch = f"global batch {members[0]['global_batch']}"
        out += [f"### Strong scaling: {title(members[0], batch)}\n",
                cli.markdown_table(
                    ["ranks", "engine", "batch per rank", "img/s", "speedup", "efficiency", "NIH epoch"],
                    [[str(r["ranks"]), transport(r), str(r["local_batch"]), fmt(r["images_per_sec"]),
                      fmt(r["strong_speedup"], 2), fmt(r["strong_efficiency"], percent=True),
                      duration(r["nih_epoch_seconds"])] for r in members]), ""]
    return out


def no_base_note(members: list[dict]) -> str:
    """Which engines of a table have no 1-rank run, the base of speedup and efficiency."""
    missing = sorted({transport(r) for r in members if r["speedup"] is None})
    return (f"\nSpeedup and efficiency are measured against a 1-rank run of the same settings and "
            f"engine; these runs have none for {', '.join(missing)}, so those cells are \"-\".")


def write_csv(rows: list[dict], path: str | Path) -> None:
    extra = [k for k in ("baseline_images_per_sec", "ratio_to_baseline") if any(k in r for r in rows)]
    with cli.output(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS + extra, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: str | Path) -> None:
    """Throughput and efficiency against ranks, one line per group (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    groups = sorted({tuple(r[k] for k in GROUP_KEYS) for r in rows}, key=lambda g: tuple(map(str, g)))
    for group in groups:
        members = [r for r in rows if tuple(r[k] for k in GROUP_KEYS) == group]
        label = f"{title(members[0])}, {transport(members[0])}"
        ranks = [r["ranks"] for r in members]
        ax_t.plot(ranks, [r["images_per_sec"] for r in members], "o-", label=label)
        timed = [r for r in members if r["efficiency"] is not None]  # none without a 1-rank run
        if timed:
            ax_e.plot([r["ranks"] for r in timed], [100 * r["efficiency"] for r in timed], "o-", label=label)
        if any(r.get("baseline_images_per_sec") for r in members):
            base = [(r["ranks"], r["baseline_images_per_sec"]) for r in members if r.get("baseline_images_per_sec")]
            ax_t.plot(*zip(*base, strict=False), "s--", label=f"baseline ({label})")
    ax_t.set(xlabel="ranks", ylabel="images / s (global)", title="Throughput")
    ax_t.set_ylim(bottom=0)
    ax_e.set(xlabel="ranks", ylabel="efficiency (%)", title="Weak-scaling efficiency", ylim=(0, 110))
    for ax in (ax_t, ax_e):
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with cli.output(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def duration(seconds: float) -> str:
    """Seconds as s, min or h, whichever reads best."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
