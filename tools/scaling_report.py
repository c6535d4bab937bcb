#!/usr/bin/env python3
"""Scaling tables from training run logs: Markdown on stdout, optional CSV and PNG plot. Weak
scaling (a table per per-rank batch) and, for runs of one global batch over several world
sizes, strong scaling; per row, the time per epoch of NIH's training split and the epochs'
bottleneck verdict with the numbers behind it.

    python tools/scaling_report.py runs/np1 runs/np2 --csv scaling.csv --plot scaling.png
    python tools/scaling_report.py 'runs/*' --baseline docs/dell_v100_baseline.csv
    python tools/scaling_report.py --project runs/np1            # project a 1-rank run to 256
    python tools/scaling_report.py --project --step-time 0.35 --params 7e6 --batch 64

--project: weak-scaling projection under a ring-allreduce cost model (chexnet_hvd.projection:
allreduce_seconds, project); the step time, parameter count and per-rank batch come from a
1-rank run log or from the flags. The fabric: --bandwidth-gbs and --latency-us between nodes,
--gpus-per-node and --intra-bandwidth-gbs / --intra-latency-us within one (hierarchical
allreduce unless --flat-ring); --global-batch adds strong-scaling columns; the epoch column is
--epoch-images (default: NIH's training split) at the projected rate. E.g. 8 GPUs per node on
NVLink, 25 GbE between nodes:

    python tools/scaling_report.py --project --step-time 0.2 --params 7e6 --batch 64 \
        --gpus-per-node 8 --bandwidth-gbs 3.125 --latency-us 30 --global-batch 1024
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from chexnet_hvd import cli, projection, scaling  # noqa: E402
from chexnet_hvd.runlog import RunLogError  # noqa: E402


@dataclasses.dataclass
class ReportConfig:
    runs: list[str] = cli.field([], help="run directories, runlog.jsonl files or globs")
    csv: str = cli.field("", help="also write the table as CSV here")
    plot: str = cli.field("", help="also write a PNG plot (throughput, efficiency vs ranks) here")
    baseline: str = cli.field("", help="reference CSV (columns ranks,images_per_sec) shown beside ours")
    skip_epochs: int = cli.field(1, help="leading epochs per run left out (warm-up)", minimum=0)
    project: bool = cli.field(False, help="project throughput and efficiency to --ranks instead")
    step_time: float = cli.field(0.0, help="--project: seconds per step on 1 rank (0: from the run log)",
                                 minimum=0)
    params: float = cli.field(0.0, help="--project: trainable parameters (0: from the run log)",
                              minimum=0)
    batch: int = cli.field(0, help="--project: images per rank per step (0: from the run log)",
                           minimum=0)
    ranks: list[int] = cli.field([1, 2, 4, 8, 16, 32, 64, 128, 256], help="--project: world sizes",
                                 minimum=1)
    bandwidth_gbs: float = cli.field(projection.Network.bandwidth_gbs,
                                     help="--project: link bandwidth in GB/s (default: 100 Gb/s EDR InfiniBand)",
                                     exclusive_minimum=0)
    latency_us: float = cli.field(projection.Network.latency_us, help="--project: latency per ring step, us",
                                  minimum=0)
    overlap: float = cli.field(projection.Network.overlap, help="--project: fraction of the allreduce "
                               "hidden behind the backward pass (0..1)", minimum=0, maximum=1)
    fp16_allreduce: bool = cli.field(False, help="--project: gradients sent as fp16 (2 bytes, not 4)")
    backward_passes_per_step: int = cli.field(1, help="--project: batches accumulated per allreduce",
                                              minimum=1)
    gpus_per_node: int = cli.field(projection.Network.gpus_per_node, help="--project: ranks per node", minimum=1)
    intra_bandwidth_gbs: float = cli.field(projection.Network.intra_bandwidth_gbs,
                                           help="--project: bandwidth within a node, GB/s (default: NVLink 2)",
                                           exclusive_minimum=0)
    intra_latency_us: float = cli.field(projection.Network.intra_latency_us,
                                        help="--project: latency per ring step within a node, us", minimum=0)
    flat_ring: bool = cli.field(False, help="--project: one ring over all ranks (MPI, Gloo, the tf "
                                "engine on CPUs), not hierarchical (NCCL)")
    global_batch: int = cli.field(0, help="--project: also strong scaling at this fixed global batch",
                                  minimum=0)
    epoch_images: int = cli.field(scaling.NIH_TRAIN_IMAGES, help="--project: images per epoch (the "
                                  "epoch-time column; default: NIH's official training split)", minimum=1)


def projected(cfg: ReportConfig) -> str:
    """The projection table, from the flags or the first 1-rank run of the logs given."""
    step, params, batch = cfg.step_time, cfg.params, cfg.batch
    if not (step and params and batch):
        single = [r for r in scaling.load_all(scaling.find_runlogs(cfg.runs))
                  if r.start.get("world_size") == 1 and scaling.timed_epochs(r.epochs, cfg.skip_epochs)]
        if not single:
            raise RunLogError(f"{' '.join(cfg.runs) or '--project'}: needs a 1-rank run log with timed "
                              "epochs, or all of --step-time, --params and --batch")
        start, epochs = single[0].start, scaling.timed_epochs(single[0].epochs, cfg.skip_epochs)
        batch = batch or start["local_batch"]
        step = step or batch / (sum(e["images_per_sec"] for e in epochs) / len(epochs))
        params = params or start.get("trainable_params", 0)
        if not params:
            raise RunLogError(f"{single[0].path}: no trainable_params in the run log; pass --params")
    net = projection.Network(cfg.bandwidth_gbs, cfg.latency_us, cfg.overlap, cfg.gpus_per_node,
                          cfg.intra_bandwidth_gbs, cfg.intra_latency_us, not cfg.flat_ring)
    grad_bytes = params * (2 if cfg.fp16_allreduce else 4)
    rows = projection.project(step, grad_bytes, batch, cfg.ranks, net, cfg.backward_passes_per_step,
                           cfg.global_batch, cfg.epoch_images)
    within = (f"; {net.gpus_per_node} per node at {net.intra_bandwidth_gbs} GB/s, {net.intra_latency_us} us, "
              f"{'hierarchical' if net.hierarchical else 'flat ring'}" if net.gpus_per_node > 1 else "")
    return (f"Projection: {step:.4f} s per step on 1 rank, batch {batch}, {params:,.0f} parameters "
            f"({grad_bytes / 1e6:.1f} MB of gradients), {net.bandwidth_gbs} GB/s, "
            f"{net.latency_us} us per ring step, overlap {net.overlap}{within}"
            + (f", {cfg.backward_passes_per_step} backward passes per step" if cfg.backward_passes_per_step > 1 else "")
            + (f"; strong scaling at a global batch of {cfg.global_batch}" if cfg.global_batch else "")
            + f"; epoch: {cfg.epoch_images:,} images\n\n" + projection.projection_markdown(rows))


def measured(cfg: ReportConfig) -> list[dict]:
    """The scaling rows of the run logs, with the baseline beside them when given."""
    if not cfg.runs:
        raise cli.InputError("runs", "give at least one run directory, runlog.jsonl or glob")
    runs = scaling.load_all(scaling.find_runlogs(cfg.runs))
    for path, lines in sorted({(r.path, tuple(r.unreadable)) for r in runs if r.unreadable}):
        print(f"note: {path}: skipped unreadable line(s) {', '.join(map(str, lines))} "
              "(a write cut short by a kill or a full disk)", file=sys.stderr)
    rows = scaling.scaling_rows(runs, cfg.skip_epochs)
    if not rows:
        raise RunLogError(f"{' '.join(cfg.runs)}: no finished epochs in the run logs")
    return scaling.add_baseline(rows, scaling.read_baseline(cfg.baseline)) if cfg.baseline else rows


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(ReportConfig, __doc__, argv, positional=["runs"],
                           prog="python tools/scaling_report.py")
    try:  # a bad run log is the user's input: one line, exit 2
        if cfg.project:
            print(projected(cfg))
            return 0
        rows = measured(cfg)
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
