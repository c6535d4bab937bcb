#!/usr/bin/env python3
"""`make bench`: run every benchmark, then render docs/benchmarks.md from their JSON results.

    .venv/bin/python bench/run_all.py            # run + render (about 2 hours on 2 cores)
    .venv/bin/python bench/run_all.py --render   # only render the page from docs/bench_*.json
    .venv/bin/python bench/run_all.py --quick    # smoke run, small sizes, into a scratch folder

Each benchmark runs as it is, in its own process, writing its JSON (and figures) into the output
folder (docs/, or with --quick a scratch folder: smoke numbers never reach docs/). How long each
took is kept in bench_runs.json and shown at the end of the page.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import YIELD, machine, rate_gbs, today

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE_DIR = DOCS  # where the JSON results, figures and the page are: docs/, or --quick's scratch folder
# Each benchmark with the flags of a smoke run (--quick): the same code paths, small sizes.
BENCHMARKS = {
    "bench_train.py": ["--steps", "3", "--small-steps", "20", "--warmup", "1", "--repeats", "1", "--dense-repeats", "1"],
    "bench_data.py": ["--copies", "1", "--repeats", "1", "--cpu-seconds", "1"],
    "bench_scaling.py": ["--image-size", "64", "--steps", "3", "--epochs", "2"],
    "bench_comm.py": ["--repeats", "1", "--steps", "4"],
    "bench_inference.py": ["--repeats", "1"],
    "bench_nas.py": ["--seeds", "5", "--trials", "2", "--search-trials", "2"],
    "bench_scale.py": ["--quick"],
}
# Where a benchmark writes files besides its JSON, as flags taking the output folder.
OUTPUT_FLAGS = {"bench_scaling.py": ["--docs", "{dir}"], "bench_nas.py": ["--report", "{dir}/nas"]}


def verdict(value: float, goal: float) -> str:
    return f"{value:.2f} (goal >= {goal:.2f}: {'met' if value >= goal else 'MISSED'})"


def rounds_range(small: dict, num: str, den: str) -> str:
    """The spread of a ratio over the rounds (each round's own), when there are several."""
    runs = small.get("runs", {})
    if small["repeats"] < 2 or num not in runs:
        return ""
    ratios = [a / b for a, b in zip(runs[num], runs[den], strict=True)]
    return f" (the rounds' own: {min(ratios):.2f} to {max(ratios):.2f})"


def section_trainer(r: dict) -> list[str]:
    small = r["small"]
    ratio = small["records_over_bare"]
    lines = [
        f"## The trainer's cost per step ({small['model']}, {small['image_size']} px, batch "
        f"{small['batch']}, 1 rank)", "",
        f"Machine: {small.get('machine', r['machine'])}, {small.get('date', r['date'])}; {small['steps']} "
        f"timed steps each (a bare step takes {small['step_ms_bare']:.1f} ms here, the scale of a GPU step), "
        f"warm-up left out; {small['repeats']} rounds: images/s the medians, the table's ratio column "
        "the medians' ratio, the ratios below it the medians of each round's own. Like with like: "
        "every loop trains the same model "
        "behind the same in-graph preprocessing on uint8 batches.", "",
        "| configuration | images/s | / bare loop |", "|---|---:|---:|",
        *[f"| {label} | {small[key]:.0f} | {small[key] / small['bare_loop']:.3f} |" for key, label in (
            ("bare_loop", "bare Horovod loop, in-memory batch"),
            ("bare_loop_feed", "bare Horovod loop, in-memory batch through the trainer's per-batch maps"),
            ("bare_loop_records", "bare Horovod loop on the uint8 records"),
            ("keras_fit", "plain Keras fit, in-memory batch, no callbacks"),
            ("trainer_synthetic_quiet", "trainer, in-memory input, stall watch and stop agreement off"),
            ("trainer_synthetic_stall_watch", "trainer, in-memory input, + stall watch"),
            ("trainer_synthetic_stop_agreement", "trainer, in-memory input, + stop agreement"),
            ("trainer_synthetic", "trainer, in-memory input (defaults)"),
            ("trainer_records_quiet", "trainer on uint8 records, stall watch and stop agreement off"),
            ("trainer_records", "trainer on uint8 records (defaults)"),
            ("keras_fit_calls", "plain Keras fit, in-memory batch, 8 steps per call"),
            ("trainer_records_calls", "trainer on uint8 records, --steps-per-execution 8"),
            ("trainer_xla", "trainer, in-memory input, --xla"))], "",
        f"- trainer on records / bare loop: {verdict(ratio, 0.95)} at the trainer's default of 1 step "
        f"per call of Keras' train function" + rounds_range(small, "trainer_records", "bare_loop"),
        f"- at --steps-per-execution 8 (the GPU recipes' and the Slurm templates' setting): trainer "
        f"on records / bare loop: {verdict(small['records_calls_over_bare'], 0.95)}"
        + rounds_range(small, "trainer_records_calls", "bare_loop") + "; Keras' fit loop / "
        f"bare loop {small['fit_calls_over_bare']:.3f} (one step per call: {small['fit_over_bare']:.3f})",
        f"- the pieces: Keras' fit loop / bare loop {small['fit_over_bare']:.3f}; the trainer's per-batch "
        f"maps (targets packed, feed counters) in the bare loop {small['feed_over_bare']:.3f}; the "
        f"trainer's callbacks and maps / Keras fit {small['quiet_over_fit']:.3f}; stall watch "
        f"{small['stall_watch_over_quiet']:.3f}; stop agreement {small['stop_agreement_over_quiet']:.3f} "
        f"(at 1 rank it holds no collective, only integer work per step: this figure is the "
        f"rounds' noise); "
        f"the records pipeline on these 2 shared cores {small['records_over_synthetic']:.3f} (the bare "
        f"loop on the same records: {small['bare_records_over_bare']:.3f} of itself in memory)",
        *([f"- between rounds, one configuration's fastest / slowest round: {min(spread):.2f} to "
           f"{max(spread):.2f}; a piece smaller than that is not resolved here"]
          if small["repeats"] > 1 and (spread := [max(v) / min(v) for v in small.get("runs", {}).values()]) else []),
        f"- --xla / no XLA (in-memory input): {small['xla_over_no_xla']:.2f}"
        + (f"; DenseNet-121 at 128 px: {r['xla_over_no_xla_128']:.2f}" if "xla_over_no_xla_128" in r else "")
        + " (recipes turn XLA on only where it wins)", ""]
    if "trainer_fp32" not in r:
        return lines
    return lines + [
        f"## Trainer throughput ({r['model']}, {r['image_size']} px, batch {r['batch']}, 1 rank)", "",
        f"Machine: {r['machine']}, {r['date']}; "
        f"{r['steps']} timed steps each, warm-up steps left out"
        + (f"; medians of {r['repeats']} rounds, trainer and bare loop alternating" if r.get("repeats") else "")
        + ".", "",
        "| configuration | images/s |", "|---|---:|",
        f"| trainer, uint8 records, fp32 | {r['trainer_fp32']:.2f} |",
        *([f"| trainer, uint8 records, mixed_bfloat16 | {r['trainer_mixed_bfloat16']:.2f} |"]
          if "trainer_mixed_bfloat16" in r else []),
        f"| bare Horovod loop, in-memory uint8 batch, fp32 | {r['bare_loop_fp32']:.2f} |", "",
        f"- trainer / bare loop: {verdict(r['trainer_over_bare'], 0.98)}"
        + (f"; the rounds' ratios {r['trainer_over_bare_range'][0]:.2f} to {r['trainer_over_bare_range'][1]:.2f}"
           if "trainer_over_bare_range" in r else "; one round: a difference this small is not resolved"),
        (f"- mixed_bfloat16 / fp32: {r['bf16_over_fp32']:.2f} (no goal; measure it on your CPU "
         "before choosing)" if "bf16_over_fp32" in r else
         "- mixed_bfloat16: not measured, this CPU has no bf16 instructions (emulated, bf16 "
         "was over 4x slower than fp32 here: 23 steps had not finished in 13 minutes)"), ""]


def section_data_path(r: dict) -> list[str]:
    return [
        "## Data path: records conversion and input pipelines", "",
        f"Machine: {r['machine']}, {r['date']}. Input: {r['images']:,} images ({r['source']}), "
        f"converted to {r['records_image_size']} px records; medians of the runs in "
        "`docs/bench_data.json`.", "",
        "| measurement | 1 worker | 2 workers | ratio |", "|---|---:|---:|---:|",
        f"| conversion, end to end (s, {r['images']:,} images) | {r['convert_seconds_1_worker']:.1f} | "
        f"{r['convert_seconds_2_workers']:.1f} | {r['convert_end_to_end_speedup']:.2f} |",
        f"| conversion, steady state (img/s) | {r['convert_steady_images_per_sec_1_worker']:.1f} | "
        f"{r['convert_steady_images_per_sec_2_workers']:.1f} | {r['convert_steady_speedup']:.2f} |",
        f"| fixed start cost (s) | {r['convert_start_seconds_1_worker']:.1f} | "
        f"{r['convert_start_seconds_2_workers']:.1f} | |", "",
        f"- conversion, 2 vs 1 worker processes, steady state: {verdict(r['convert_steady_speedup'], 1.8)}; "
        f"end to end on {r['images']:,} images, start included: {verdict(r['convert_end_to_end_speedup'], 1.8)}. "
        "The steady-state rate is (n - n/3) / (t(n) - t(n/3)); at the full 112,120 images the "
        "start cost is a fraction of a percent.", "",
        *section_pipeline(r)]


def section_pipeline(r: dict) -> list[str]:
    """The training input pipeline per CPU-second (bench_data.py's `pipeline`)."""
    if "pipeline" not in r:  # a bench_data.json written before the pipeline was measured this way
        return ["**Input pipeline per CPU-second**: not measured yet by the current `bench/bench_data.py`.", ""]
    p, size, batch = r["pipeline"], r["pipeline_image_size"], r["pipeline_batch"]
    png, u8, raw = p["png"], p["uint8"], p["raw"]
    steps = list(png["step_us_per_image"])
    return [
        f"**Input pipeline per CPU-second** ({size} px model, batch {batch}, 256-px records; one "
        "thread, process CPU time: the pipeline's cost whatever else ran on the machine). Records of "
        "one size leave the CPU as uint8 batches; resize, scaling and normalisation run in the "
        "model's graph (on the GPU when there is one)."
        " PNG records store every row with PNG's Up filter (`images.png_up`), the cheapest of "
        "PNG's filters to undo.", "",
        "| records | images per CPU-second | with --crop | goal | the per-record path, float work "
        "on the CPU (before) | wall img/s, 2 threads | bytes per image | NIH, 112,120 images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| PNG (the default) | {png['images_per_cpu_second']:,} | {png['images_per_cpu_second_crop']:,} | "
        f"{png['goal']:,} | {png['per_record_float_on_cpu']:,} | {png['images_per_sec_2_threads']:,} | "
        f"{r['bytes_per_image_png_256']:,} | {r['nih_112120_gb_png_256']:.1f} GB |",
        f"| uint8 (`--encoding uint8`) | {u8['images_per_cpu_second']:,} | {u8['images_per_cpu_second_crop']:,} | "
        f"{u8['goal']:,} | {u8['per_record_float_on_cpu']:,} | {u8['images_per_sec_2_threads']:,} | "
        f"{r['bytes_per_image_uint8_256']:,} | {r['nih_112120_gb_uint8_256']:.1f} GB |",
        *([f"| PNG at the model's size (224 px, `--image-size 224`) | {p['png_224']['images_per_cpu_second']:,} | - | "
           f"{png['goal']:,} | - | - | {r['bytes_per_image_png_224']:,} | {r['nih_112120_gb_png_224']:.1f} GB |"]
          if "png_224" in p else []),
        f"| raw PNG files (1024 px, `--format raw`: source sizes, float work on the CPU) | "
        f"{raw['images_per_cpu_second']:,} | - | - | - | - | - | - |", "",
        f"- PNG records: {verdict(png['images_per_cpu_second'] / png['goal'], 1.0)} of the goal of "
        f"{png['goal']:,} images per CPU-second (the ratio to it shown); uint8 records: "
        f"{verdict(u8['images_per_cpu_second'] / u8['goal'], 1.0)} of {u8['goal']:,}"
        + (f"; PNG records at the model's size: {verdict(p['png_224']['images_per_cpu_second'] / png['goal'], 1.0)} "
           f"of {png['goal']:,}." if "png_224" in p else "."),
        *pipeline_misses(r),
        "- What each step costs, CPU microseconds per image (each step measured as the pipeline "
        "up to it minus the pipeline up to the step before, in separate processes; a step "
        "cheaper than the noise can show as negative):", "",
        "| step | PNG records | uint8 records |", "|---|---:|---:|",
        *[f"| {step} | {png['step_us_per_image'][step]:.1f} | {u8['step_us_per_image'][step]:.1f} |"
          for step in steps], "",
        "- Cores per GPU for the input pipeline alone (the float work on the GPU): "
        + "; ".join(f"at {rate:,} img/s, {png[f'cores_per_gpu_at_{rate}']:.2f} with PNG records"
                    + (f" ({p['png_224'][f'cores_per_gpu_at_{rate}']:.2f} stored at 224 px)" if "png_224" in p else "")
                    + ", "
                    f"{u8[f'cores_per_gpu_at_{rate}']:.2f} with uint8 records, "
                    f"{raw[f'cores_per_gpu_at_{rate}']:.1f} with a raw index"
                    for rate in (2000, 4000)) + " (2,000-4,000 img/s: DenseNet-121 in mixed "
        "precision on an A100 and newer GPUs; derived, not measured here).", ""]


def pipeline_misses(r: dict) -> list[str]:
    """Where each encoding's missed pipeline goal goes, from the step costs measured."""
    p, notes = r["pipeline"], []
    png, u8 = p["png"], p["uint8"]
    if png["images_per_cpu_second"] < png["goal"]:
        decode = png["step_us_per_image"]["decode"]
        notes.append(
            f"- PNG: decoding one 256-px record alone takes {decode:.0f} us of CPU (libpng through "
            f"tf.io.decode_png), a ceiling of {1e6 / decode:,.0f} images per CPU-second with every other "
            f"step free; the goal of {png['goal']:,} needs records stored at the model's size (fewer "
            "pixels to inflate) or uint8 records."
            + (f" Stored at 224 px, a record decodes in {p['png_224']['decode_us_per_image']:.0f} us."
               if "png_224" in p else ""))
    if u8["images_per_cpu_second"] < u8["goal"] and "images_per_cpu_second_shuffle_256" in u8:
        block = 2048 * r["bytes_per_image_uint8_256"] / 1e6
        stream = sum(v for k, v in u8["step_us_per_image"].items() if not k.startswith("float"))
        whole, small = 1e6 / u8["images_per_cpu_second"], 1e6 / u8["images_per_cpu_second_shuffle_256"]
        notes.append(
            f"- uint8: the steps add up to {stream:.0f} us per image when measured as one endless stream; "
            f"the trainer's pipeline, which reads each epoch as its own piece through a shuffle buffer "
            f"(the default 2,048 records of {r['bytes_per_image_uint8_256'] / 1e3:.0f} kB hold {block:.0f} MB, "
            f"beyond the CPU's caches), costs {whole:.0f} us. With --shuffle-buffer 256 "
            f"({block / 8:.0f} MB) it costs {small:.0f} us ({u8['images_per_cpu_second_shuffle_256']:,} images "
            f"per CPU-second; PNG records: {png['images_per_cpu_second_shuffle_256']:,}): the buffer's size "
            f"explains {whole - small:.0f} of the {whole - stream:.0f} us between the two; the other "
            f"{small - stream:.0f} us (the per-epoch pieces) are not separated here.")
    return notes


def section_engines(r: dict) -> list[str]:
    """Horovod beside TensorFlow's MultiWorkerMirroredStrategy (--engine tf), the same job."""
    runs = r["runs"]
    if "1x2_records_tf" not in runs:
        return []
    return [
        "**Two engines, the same job** (TFRecords; tf: `chexnet_hvd.launch`, ring all-reduce):", "",
        "| ranks | horovod images/s | tf images/s | tf / horovod |", "|---:|---:|---:|---:|",
        f"| 1 (x 2 threads) | {runs['1x2_records']['images_per_sec']:.2f} | "
        f"{runs['1x2_records_tf']['images_per_sec']:.2f} | {r['tf_over_horovod_1_rank']:.2f} |",
        f"| 2 (x 1 thread) | {runs['2x1_records']['images_per_sec']:.2f} | "
        f"{runs['2x1_records_tf']['images_per_sec']:.2f} | {r['tf_over_horovod_2_ranks']:.2f} |", ""]


def section_scaling(r: dict) -> list[str]:
    runs = r["runs"]
    return [
        f"## Scaling on this machine ({r['model']}, {r['image_size']} px, batch {r['batch']} per rank, fp32)", "",
        f"Machine: {r['machine']}, {r['date']}; the real trainer, {r['steps']} steps per epoch, "
        f"median of {r['epochs_timed']} epochs after a warm-up epoch.", "",
        "| run | images/s (global) |", "|---|---:|",
        f"| 1 rank x 2 threads, TFRecords | {runs['1x2_records']['images_per_sec']:.2f} |",
        f"| 1 rank x 2 threads, in-memory synthetic input | {runs['1x2_in_memory']['images_per_sec']:.2f} |",
        f"| 2 ranks x 1 thread (horovodrun --gloo), TFRecords | {runs['2x1_records']['images_per_sec']:.2f} |",
        f"| 1 rank x 1 thread, TFRecords | {runs['1x1_records']['images_per_sec']:.2f} |", "",
        f"- TFRecords / in-memory input: {verdict(r['records_over_in_memory'], 0.97)}",
        f"- 2 ranks x 1 thread / 1 rank x 2 threads: {verdict(r['two_ranks_over_two_threads'], 0.90)}", "",
        *section_engines(r),
        "The Horovod and tf engine runs through `tools/scaling_report.py` (docs/scaling.md, .csv, .png;"
        " both engines in one table):", "",
        (PAGE_DIR / "scaling.md").read_text().strip() if (PAGE_DIR / "scaling.md").is_file() else "(missing)", "",
        "![scaling](scaling.png)", "",
        "**Projection check.** A 2-rank allreduce of the model's "
        f"{r['gradient_bytes'] / 1e6:.1f} MB of fp32 gradients took {r['allreduce_seconds_2_ranks'] * 1e3:.1f} ms "
        f"here (Gloo over loopback: {r['effective_bandwidth_gbs']:.2f} GB/s effective). The ring-allreduce "
        "model (overlap 0) with that bandwidth and the 1 rank x 1 thread step time predicts a "
        f"2-rank step of {r['projected_step_seconds_2x1']:.3f} s; measured: "
        f"{r['measured_step_seconds_2x1']:.3f} s, an error of {r['projection_error'] * 100:+.1f}%. "
        "A negative error means the model is optimistic: here the two ranks also compete for the "
        "same 2 cores and memory bandwidth (each with its own input-pipeline threads and "
        "Horovod background thread), which a model of separate GPUs leaves out; a positive "
        "one would mean Horovod hid part of the allreduce behind the backward pass.", ""]


def first_error(text: str) -> str:
    """What a failed run's output says first: its first `error:` line (the ranks' own), else its
    last line."""
    lines = text.strip().splitlines() or [""]
    return next((line for line in lines if line.startswith("error: ")), lines[-1])


BEYOND_RING = 1.5 * 1.05  # a 2 -> 4 node growth beyond the ring's 1.5x (2 (N-1)/N) and the noise
ENGINES = ("horovod", "horovod-ring", "tf", "gloo")  # the order bench_comm sweeps them in


def sweep_growth(r: dict, size: float = 28_000_000) -> dict:
    """Per engine, the sweep's allreduce of `size` bytes on 4 nodes over the same on 2 (1 rank each)."""
    at = {(a["engine"], a["nodes"]): a["seconds"] for a in r["allreduce"] if a["bytes"] == size and a["per_node"] == 1}
    return {e: at[(e, 4)] / at[(e, 2)] for e in sorted({e for e, _ in at}) if (e, 4) in at and (e, 2) in at}


def comm_notes(r: dict) -> list[str]:
    """What the errors above 10% in the communication tables come from, from the measurements."""
    big = {(a["engine"], a["nodes"], a["per_node"]): a for a in r["allreduce"] if a["bytes"] == 28_000_000}
    at = {key: a["seconds"] for key, a in big.items()}
    growth = {e: g for e, g in sweep_growth(r).items() if g > BEYOND_RING}
    low = ", ".join(f"{big[(e, 4, 1)]['error_flat'] * 100:+.0f}% ({e})" for e in growth if (e, 4, 1) in big)
    notes = []
    if growth:
        notes.append(
            "- 2 -> 4 nodes (1 rank each), 28 MB: the measured allreduce grows "
            + ", ".join(f"{g:.2f}x ({e})" for e, g in growth.items())
            + "; the ring model's bandwidth term grows 1.5x (2 (N-1)/N), so one fitted bandwidth "
            "cannot match both and the 4-node errors ("
            f"{low}) are this gap"
            + ("; the rate check below measures whether the gap is the model's." if r.get("rates") else "."))
    for e in ("horovod", "horovod-ring"):
        if (e, 4, 1) in at and (e, 4, 2) in at:
            notes.append(
                f"- {e}, 28 MB on 4 nodes: 1, 2 and 4 ranks per node take "
                + ", ".join(f"{at[(e, 4, k)]:.2f} s" for k in (1, 2, 4) if (e, 4, k) in at)
                + f" ({at[(e, 4, 2)] / at[(e, 4, 1)]:.2f}x from 1 to 2 per node; a flat ring's bandwidth term grows "
                "1.17x, 1.5 -> 1.75, a ring across the nodes' not at all).")
    sent = {(a["engine"], a["nodes"], a["per_node"]): a["sent_per_byte"] for a in r["allreduce"] if "sent_per_byte" in a}
    if sent:
        notes.append(
            "- Bytes each node sent over its link per byte allreduced (the sweep's; a ring that "
            "crosses each link once sends 2 (N-1)/N, N ranks): "
            + "; ".join(f"{e} {n} x {k}: {', '.join(f'{v:g}' for v in per)} (ring {2 * (n * k - 1) / (n * k):.2f})"
                        for (e, n, k), per in sent.items()) + ".")
    notes.append(
        "- Not measured: Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE. Its hierarchical allreduce is "
        "NCCL's (NCCLHierarchicalAllreduce, GPUs only); on CPUs the collective is Open MPI's or "
        "Gloo's own. "
        "`tools/scaling_report.py --project` models NVLink-within-a-node layouts hierarchically.")
    return notes + fusion_note(r) + rate_note(r) + algorithm_note(r) + mpi_notes(r) + cycle_note(r)


def mpi_notes(r: dict) -> list[str]:
    """Two measured departures of Horovod over MPI from the ring model: 2-rank exchanges whose
    directions take turns, and trainer steps that spend more than one allreduce of their bytes."""
    notes = []
    pair = {a["bytes"]: a for a in r["allreduce"] if a["engine"] == "horovod-ring" and (a["nodes"], a["per_node"]) == (2, 1)}
    if 1e6 in pair and 28e6 in pair:
        one_way = 1e6 / (r["link_gbs"] * 1e9)
        big = pair[28e6]["all"]
        fast = [t for t in r["train"] if t["engine"] == "horovod-ring" and (t["nodes"], t["per_node"]) == (2, 1)
                and (alone := alone_seconds(r, t)) and communication(t) < 0.9 * alone]
        notes.append(
            f"- Open MPI's 2-rank exchange (horovod-ring, 2 x 1): 1 MB takes {pair[1e6]['seconds'] * 1e3:.0f} ms, "
            f"{pair[1e6]['seconds'] / one_way:.1f}x the {one_way * 1e3:.0f} ms one direction needs at the link rate, "
            "as if the two directions took turns rather than sharing the full-duplex link; at 28 MB its repeats took "
            + ", ".join(f"{x:.2f}" for x in big) + " s, so the 2-node rows and the fit they enter hold "
            "whichever mode the repeats hit"
            + (f" (the trainer's 2-node steps communicated in less: ratio below 0.9 for {len(fast)} of its runs in "
               "the table of the step's error)." if fast else "."))
    ratios: dict = {}
    for t in r["train"]:
        if ((t["nodes"], t["per_node"]) == (4, 1) and "resnet50" not in t["flags"] and "HOROVOD_" not in t["flags"]
                and (alone := alone_seconds(r, t))):
            ratios.setdefault(t["engine"], []).append(communication(t) / alone)
    mpi = [x for e, v in ratios.items() if e.startswith("horovod") for x in v]
    other = [x for e, v in ratios.items() if not e.startswith("horovod") for x in v]
    if mpi and other and min(mpi) > max(other):
        notes.append(
            "- DenseNet-121 on 4 x 1, the step's communication over one allreduce of its bytes: "
            + "; ".join(f"{e} {value_range(v, '.2f')}" for e, v in ratios.items())
            + f". Horovod over MPI spends {(min(mpi) - 1) * 100:.0f}-{(max(mpi) - 1) * 100:.0f}% of an allreduce "
            f"more per step, Gloo and the tf engine at most {max(0, max(other) - 1) * 100:.0f}%, on the same links "
            "and layout (runs at another Horovod cycle aside: below). Where it goes is measured only for "
            "the traced runs the per-round table holds; for the others it is not accounted for.")
    busiest = {t["engine"]: t for t in r["train"] if (t["nodes"], t["per_node"]) == (4, 4) and not t["flags"]}
    if {"horovod", "tf"} <= set(busiest) and busiest["horovod"]["compute"] > 1.5 * busiest["tf"]["compute"]:
        h, tf = busiest["horovod"], busiest["tf"]
        median = statistics.median(h["compute_seconds"])
        # the update is scaled by the probe (predict_train), so a probe's excess counts twice
        at_median = h["predicted_step_flat"] - (h["compute"] - median) * (1 + h["update"] / h["compute"])
        notes.append(
            f"- 16 ranks on the 2 cores (4 x 4): Horovod over MPI's slowest compute probe took {h['compute']:.2f} s, "
            f"{h['compute'] / tf['compute']:.1f}x the tf engine's ({tf['compute']:.2f} s) on the same layout, and its "
            f"step is predicted {h['error_flat']:+.0%}. Its 16 probes spread from {min(h['compute_seconds']):.2f} to "
            f"{h['compute']:.2f} s (median {median:.2f}), the tf engine's from {min(tf['compute_seconds']):.2f} to "
            f"{tf['compute']:.2f} s; the model takes the slowest and scales the update by it, so with the median "
            f"rank's probe it would predict {at_median:.2f} s ({at_median / h['measured_step'] - 1:+.0%})"
            + "".join(f"; at a {t['flags'].partition('=')[2]} ms cycle, below, they spread from "
                      f"{min(t['compute_seconds']):.2f} to {t['compute']:.2f} s" for t in r["train"]
                      if (t["engine"], t["ranks"]) == ("horovod", 16) and t["flags"].startswith("HOROVOD_CYCLE_TIME="))
            + ". " + spinning_note(r))
    return notes


def spinning_note(r: dict) -> str:
    """Horovod over MPI's 16-rank run with Open MPI told to yield between its polls while it
    waits (common.YIELD) beside the same run at Open MPI's default: whether ranks polling at
    full speed in their waits are what slows the slowest probes (one run each)."""
    pairs = [(y, h) for y, h in paired(r, YIELD) if (y["engine"], y["ranks"]) == ("horovod", 16)]
    if not pairs:
        return ("Why Horovod's probes spread so is not measured here (Horovod's background threads and "
                "MPI's progress share the cores).")
    y, h = pairs[0]
    gap = h["compute"] - statistics.median(h["compute_seconds"])  # the slowest probe over the median, by default
    verdict = ("in this run, polling at full speed was most of the spread (yielding took more than half of "
               "the slowest probe's excess over the median off)" if y["compute"] < h["compute"] - gap / 2
               else "in this run, polling at full speed was not most of the spread (yielding left at least "
               "half of the slowest probe's excess over the median)")
    return (f"With Open MPI told to call sched_yield between its polls while it waits ({y['flags']}; under "
            "srun it has no sign that its ranks share cores, so by default it polls at full speed), one "
            f"run: the probes spread from {min(y['compute_seconds']):.2f} to {y['compute']:.2f} s (median "
            f"{statistics.median(y['compute_seconds']):.2f}), the step took {y['measured_step']:.2f} s "
            f"({y['measured_step'] / h['measured_step'] - 1:+.0%} on Open MPI's default; the model's error "
            f"{y['error_flat']:+.0%}): {verdict}; one run each, so this is no more than what these two showed.")


def cycle_note(r: dict) -> list[str]:
    """The runs at a longer HOROVOD_CYCLE_TIME beside the same engine and layout at Horovod's own
    (the delay between Horovod's tensor fusion cycles, each negotiating what the ranks have ready),
    against the spread of Horovod over MPI's repeats in the rate check."""
    pairs = paired(r, "HOROVOD_CYCLE_TIME=")
    if not pairs:
        return []
    def excess_ratio(t: dict) -> str:  # communication over one allreduce of its bytes alone
        return f"{communication(t) / alone:.2f}" if (alone := alone_seconds(r, t)) else "-"

    steps = [t["measured_step"] / p["measured_step"] - 1 for t, p in pairs]
    # how far Horovod over MPI's repeats of one allreduce on 4 nodes at this rate differ
    noise = max((repeat_spread(x) for x in (r.get("rates") or {}).get("rows", [])
                 if x["engine"] == "horovod" and x.get("rate", r.get("rate")) == r.get("rate") and x.get("nodes") == 4),
                default=None)
    moved = value_range(steps, "+.0%", " to ")
    return [f"- Horovod's cycle at {pairs[0][0]['flags'].partition('=')[2]} ms (HOROVOD_CYCLE_TIME: the delay "
            "between its tensor fusion cycles, each negotiating what the ranks have ready), one run each: step, compute probe and communication over one allreduce, at "
            "Horovod's own cycle -> the longer one: "
            + "; ".join(f"{t['engine']} {t['nodes']} x {t['per_node']}: {p['measured_step']:.2f} -> "
                        f"{t['measured_step']:.2f} s, {p['compute']:.2f} -> {t['compute']:.2f} s, "
                        f"{excess_ratio(p)} -> {excess_ratio(t)}" for t, p in pairs)
            + f". The steps moved by {moved}"
            + (f", within the {noise:.0%} by which Horovod over MPI's repeats of one allreduce on 4 nodes at this "
               "rate differ (the rate check): single runs do not settle whether the cycle matters." if noise and
               max(map(abs, steps)) < noise else ".")]


def without(t: dict, marker: str) -> tuple:
    """A trainer run's engine, layout and flags but those holding `marker` (a setting's name)."""
    return t["engine"], t["nodes"], t["per_node"], " ".join(f for f in t["flags"].split() if marker not in f)


def paired(r: dict, marker: str) -> list[tuple[dict, dict]]:
    """Each trainer run with a setting among its flags (`marker`, e.g. "HOROVOD_CYCLE_TIME=") beside
    the same run without it."""
    plain = {without(t, marker): t for t in r["train"] if marker not in t["flags"]}
    return [(t, plain[without(t, marker)]) for t in r["train"] if marker in t["flags"] and without(t, marker) in plain]


def value_range(values: list, form: str, between: str = "-") -> str:
    """`values` as their lowest and highest, or as one value where they are all the same."""
    low, high = format(min(values), form), format(max(values), form)
    return low if low == high else f"{low}{between}{high}"


def repeat_spread(x: dict) -> float:
    """A measurement's repeats: their range over their median."""
    return (max(x["all"]) - min(x["all"])) / x["seconds"]


def algorithm_note(r: dict) -> list[str]:
    """The algorithm check: Horovod over MPI's 28 MB allreduce on 2 and 4 nodes with Open MPI's
    allreduce algorithm its own choice and forced, beside a ring at the link rate."""
    check = r.get("algorithms")
    if not check or not check["rows"]:
        return []
    at = {(x["algorithm"], x["nodes"]): x for x in check["rows"]}
    names = list(dict.fromkeys(x["algorithm"] for x in check["rows"]))
    def ring(nodes: int) -> float:  # a ring at the link rate: 2 (N-1)/N of the bytes over each link
        return 2 * (nodes - 1) / nodes * check["rows"][0]["bytes"] / (rate_gbs(check["rate"]) * 1e9)
    def cell(x: dict | None) -> str:
        return "-" if x is None else (f"{x['seconds']:.2f} ({min(x['all']):.2f}-{max(x['all']):.2f}) | "
                                      f"{ring(x['nodes']) / x['seconds']:.2f}")
    rows = [f"| {name} | {cell(at.get((name, 2)))} | {cell(at.get((name, 4)))} |" for name in names]
    forced = [n for n in names if n != "default"]
    notes = []
    if ("default", 4) in at and all((n, 4) in at for n in forced):
        nearest = min(forced, key=lambda n: abs(at[(n, 4)]["seconds"] / at[("default", 4)]["seconds"] - 1))
        fastest = min(forced, key=lambda n: at[(n, 4)]["seconds"])
        notes.append(
            f"- 4 nodes: Open MPI's own choice takes {at[('default', 4)]['seconds']:.2f} s, "
            f"{at[('default', 4)]['seconds'] / at[(nearest, 4)]['seconds']:.2f}x {nearest} forced (the nearest); "
            f"the fastest, {fastest}, takes {at[(fastest, 4)]['seconds']:.2f} s "
            f"({ring(4) / at[(fastest, 4)]['seconds']:.2f} of a ring at the link rate). The Horovod-over-MPI "
            "(`horovod`) rows above are Open MPI's own choice, which is not the ring the model assumes"
            + (f": fitted bandwidth / link rate {r['fit']['horovod']['bandwidth_gbs'] / r['link_gbs']:.2f}, told to "
               f"run the ring (`horovod-ring`) {r['fit']['horovod-ring']['bandwidth_gbs'] / r['link_gbs']:.2f}"
               if {"horovod", "horovod-ring"} <= set(r["fit"]) else "")
            + (f"; its 2 -> 4 node growth in the sweep, {growth:.2f}x, is not the ring's 1.5x: the fit's part of "
               "its errors." if (growth := sweep_growth(r).get("horovod", 1.5)) > BEYOND_RING else "."))
    if ("default", 2) in at:
        unsteady = [n for n in names if (n, 2) in at and max(at[(n, 2)]["all"]) > 1.2 * min(at[(n, 2)]["all"])]
        steady = [n for n in names if (n, 2) in at and n not in unsteady]
        notes.append(
            "- 2 nodes: " + (", ".join(unsteady) + ": repeats either near the link rate or up to "
                             f"{max(max(at[(n, 2)]['all']) / min(at[(n, 2)]['all']) for n in unsteady):.2f}x "
                             "slower" if unsteady else "every algorithm's repeats within 20%")
            + (f"; {', '.join(steady)}: within 20%" if unsteady and steady else "")
            + ". Whichever of its repeats come out slow sets a run's median, so the Horovod-over-MPI "
            "medians vary between runs by more than the model's 10% (the rate check above).")
    return [
        "", f"**Open MPI's allreduce algorithm** ({check['date']}; `bench/bench_comm.py --algorithms-only`): "
        f"Horovod over MPI's {check['rows'][0]['bytes'] / 1e6:g} MB allreduce, 1 rank per node, every link at "
        f"{check['rate']}, {check['repeats']} timed repeats; the algorithm Open MPI chooses (default) and each "
        "one forced (coll_tuned_allreduce_algorithm); seconds: median (fastest-slowest); of ring: a ring at "
        "the link rate's time over the median:", "",
        "| algorithm | 2 nodes: s | of ring | 4 nodes: s | of ring |", "|---|---:|---:|---:|---:|", *rows, "",
        *notes]


def rate_note(r: dict) -> list[str]:
    """The rate check: the 28 MB allreduce on 2 and 4 nodes at several link rates, its growth
    against the ring's 1.5x and its repeats' spread."""
    check = r.get("rates")
    if not check or not check["rows"]:
        return []
    size = check["rows"][0]["bytes"]
    at = {(x["engine"], x["rate"], x["nodes"]): x for x in check["rows"]}
    rates = sorted({x["rate"] for x in check["rows"]}, key=rate_gbs)
    engines = list(dict.fromkeys(x["engine"] for x in check["rows"]))
    rows, growth = [], {}
    for e in engines:
        for rate in rates:
            two, four = at.get((e, rate, 2)), at.get((e, rate, 4))
            if two and four:
                growth.setdefault(e, []).append(four["seconds"] / two["seconds"])
                rows.append(f"| {e} | {rate} | {two['seconds']:.2f} ({repeat_spread(two) * 100:.0f}%) | "
                            f"{four['seconds']:.2f} ({repeat_spread(four) * 100:.0f}%) | {growth[e][-1]:.2f} |")
    worst = {e: max(abs(g / 1.5 - 1) for g in gs) for e, gs in growth.items()}
    noisy = {e: max(repeat_spread(x) for x in check["rows"] if x["engine"] == e) for e in growth}
    grown = sweep_growth(r, size)
    gapped = [e for e in growth if grown.get(e, 0) > BEYOND_RING]  # the sweep's gap
    repeated = check.get("repeats", 1) >= 2
    steady = [e for e in engines if e in gapped and repeated and worst[e] <= 0.05 and noisy[e] <= 0.1
              and len(growth[e]) > 1]
    unsteady = [e for e in engines if e in growth and repeated and noisy[e] > 0.1]
    worst_step = {e: max((abs(t["error_flat"]) for t in r["train"] if t["engine"] == e), default=0) for e in unsteady}
    return [
        "", f"**The rate check** ({check['date']}; `bench/bench_comm.py --rates-only`): the 28 MB "
        "allreduce on 2 and 4 nodes, 1 rank each, with every link at each rate, median of the "
        "timed repeats (their range / median in brackets); the ring's bandwidth term grows 1.5x from "
        "2 to 4 nodes at any rate, while a cost of the 2 shared cores (fixed per byte, and shared by "
        "4 ranks rather than 2) would grow more, and weigh more as the links get faster:", "",
        "| engine | link rate | 2 nodes: s | 4 nodes: s | 4 / 2 |", "|---|---|---:|---:|---:|", *rows, "",
        *[f"- {e}: 4 / 2 within {worst[e] * 100:.0f}% of the ring's 1.5 at every rate (a cost of the shared "
          "cores would show most at the fastest links), repeats within "
          f"{noisy[e] * 100:.0f}%: its allreduce grows with the node count as the ring model says, so the "
          f"sweep's {grown[e]:.2f}x above (and the 4-node fit error it makes) did not recur: "
          "run-to-run variation of this shared machine, not a term the model lacks." for e in steady],
        *[f"- {e}: 4 / 2 of {', '.join(f'{g:.2f}' for g in growth[e])}, repeats up to {noisy[e] * 100:.0f}% "
          "apart: through these token-bucket shapers its allreduce varies by more than the model's 10% "
          f"between repeats and runs; the largest error of its trainer runs above is {worst_step[e] * 100:.0f}%."
          for e in unsteady],
    ]


def fusion_note(r: dict) -> list[str]:
    """A run with Horovod's fusion buffer set (HOROVOD_FUSION_THRESHOLD among its flags) beside the
    same run at the default buffer: steps, fused rounds per step, the model's errors."""
    def rounds(t: dict) -> str:
        same = ("engine", "nodes", "per_node", "flags")
        traced = [x for x in r.get("timeline", []) if all(x[k] == t[k] for k in same)]
        return f"{traced[0]['timeline']['rounds']:g} fused rounds a step, " if traced else ""

    return [f"- Horovod's fusion buffer, {without(t, '=')[3] or 'DenseNet-121'} on {t['nodes']} x {t['per_node']} "
            f"({t['gradient_bytes'] / 1e6:.0f} MB of gradients): the default 64 MB: {rounds(base)}step "
            f"{base['measured_step']:.2f} s (model {base['error_flat']:+.0%}); "
            f"{int(t['flags'].split('HOROVOD_FUSION_THRESHOLD=')[1].split()[0]) / 2**20:g} MB: {rounds(t)}step "
            f"{t['measured_step']:.2f} s (model {t['error_flat']:+.0%}). A buffer that holds every gradient "
            "does not make one round: Horovod fuses what the backward pass has ready at each cycle "
            "(HOROVOD_CYCLE_TIME); the model's one allreduce of all the bytes stands for both, counting no "
            "rounds (what a round costs: the per-round table)." for t, base in paired(r, "HOROVOD_FUSION_THRESHOLD=")]

LARGE = (14_000_000, 28_000_000)  # the sweep's messages of a gradient's size (bench_comm.SIZES)
SMALL = 32_000  # the sweep's smallest-but-one message: a round's latency, next to no bytes


def alone_seconds(r: dict, t: dict) -> float | None:
    """A trainer run's gradient bytes' allreduce measured alone on its layout (the sweep's nearest
    size, scaled to the bytes), per step: divided by the backward passes per step."""
    alone = {(a["engine"], a["nodes"], a["per_node"], a["bytes"]): a["seconds"] for a in r["allreduce"]}
    size = min(LARGE, key=lambda b: abs(b - t["gradient_bytes"]))
    seconds = alone.get((t["engine"], t["nodes"], t["per_node"], size))
    return None if seconds is None else seconds * t["gradient_bytes"] / size / t["backward_passes"]


def communication(t: dict) -> float:
    """A trainer run's step beyond its compute: the measured step - compute probe - update."""
    return t["measured_step"] - t["compute"] - t.get("update", 0.0)


def step_split(r: dict) -> list[str]:
    """Each trainer run's communication (`communication`) beside the same bytes'
    allreduce measured alone on the same layout: where the step model's error comes from."""
    rows = [f"| {t['engine']} | {t['nodes']} x {t['per_node']} | {t['flags'] or '-'} | "
            f"{communication(t):.3f} | {alone:.3f} | {communication(t) / alone:.2f} |"
            for t in r["train"] if (alone := alone_seconds(r, t))]
    if not rows:
        return []
    return ["**Where the step's error comes from**: each run's communication (measured step - compute "
            "probe - update) beside its gradient bytes' allreduce measured alone on the same layout (from the "
            "table above, scaled to the bytes, divided by the backward passes per step). A ratio "
            "above 1 is measured time the trainer spends beyond one allreduce of its bytes (split "
            "for the traced runs below); the rest of the step's error is the fit's (the allreduce table).", "",
            "| engine | nodes x ranks per node | flags | communication in the step (s) | allreduce alone (s) | ratio |",
            "|---|---|---|---:|---:|---:|", *rows, ""]


def wire_split(r: dict, per_round: bool) -> list[str]:
    """The runs traced with Horovod's timeline: the step split into compute, time on the wire and
    the rest, and the flat-ring model's error split into the fit's, the wire's beyond one
    allreduce of the bytes, and the rest's (the three add up to the error)."""
    rows, unsplit = [], set()
    for t in r.get("timeline", []):
        alone = alone_seconds(r, t)
        if alone is None or "predicted_step_flat" not in t:
            continue
        measured, compute = t["measured_step"], t["compute"] + t.get("update", 0.0)
        wire = t["timeline"]["wire_seconds"] / t["backward_passes"]
        rest, model = measured - compute - wire, t["predicted_step_flat"] - compute
        parts = [(model - alone) / measured, -(wire - alone) / measured, -rest / measured]
        split = wire >= 0.9 * alone  # else no split: the reasons below
        if not split:
            unsplit.add("scaled" if t["gradient_bytes"] > max(LARGE) else
                        "grouped" if t["timeline"].get("grouped_by") != "tensor" else
                        "pair" if (t["nodes"], t["per_node"]) == (2, 1) else "slower")
        rows.append(f"| {t['engine']} | {t['nodes']} x {t['per_node']} | {t['flags'] or '-'} | {measured:.3f} | "
                    f"{compute:.3f} | {wire:.3f} | {t['timeline']['rounds']:g} | {rest:.3f} | {alone:.3f} | "
                    f"{model:.3f} | {t['error_flat']:+.0%} | "
                    + (" | ".join(f"{p:+.0%}" for p in parts) if split else "- | - | -") + " |")
    if not rows:
        return []
    return ["**What of the step is on the wire, and the model's error split** (Horovod-over-MPI runs "
            "above on fewer than 16 ranks, `horovod-ring`'s at DenseNet-121's bytes only, and none at "
            "another cycle, once more with Horovod's timeline, rank 0; medians over the timed "
            "steps, per step): time inside Horovod's MPI allreduces (fused rounds merged; waiting for "
            "a slower rank's data included), and the rest of the step beyond compute (the probe and "
            "the update) and wire (negotiation, fusion-buffer copies, gaps between rounds). The "
            "flat-ring model's error (of the measured step) is the sum of three parts: the fit's "
            "(the model's allreduce of the bytes against the one measured alone), the wire's beyond "
            "one allreduce of the bytes (the gradients go as several fused rounds"
            + (": the per-round table below" if per_round else "") + "), and the rest's (not in the model).", "",
            "| engine | nodes x ranks per node | flags | measured step s | compute and update s | on the wire s | fused "
            "rounds | rest s | allreduce alone s | model's allreduce s | model error | fit | wire beyond "
            "one allreduce | rest |", "|---|---|---|" + "---:|" * 11, *rows, "",
            *(["- A row without the split, its bytes within the sweep's: its time on the wire came out "
               "below 0.9x the same bytes' allreduce alone, which the trainer's allreduce cannot beat by "
               "more than the noise: either the trace's rounds were grouped into steps wrongly (traced "
               "before the rounds were grouped by tensor: a gap between the fused rounds of one update "
               "longer than a third of a step's compute was taken for the next step), or the allreduce "
               "alone ran in a slow mode the step did not hit (Open MPI's 2-rank exchange, below); that "
               "row's wire and rest are not to be read."]
              if "grouped" in unsplit else []),
            *(["- A row without the split, traced since the rounds are grouped by tensor (each gradient's "
               "k-th allreduce is the k-th update's), its bytes within the sweep's: its time on the wire "
               "came out below 0.9x the same bytes' allreduce alone, which the trainer's allreduce cannot "
               "beat by more than the noise, so the split is not given: "
               + ("on 2 x 1 the allreduce alone ran in a slow mode the step did not hit (Open MPI's 2-rank "
                  "exchange, below)" if why == "pair" else "why, on this layout, is not measured") + "."
               for why in ("pair", "slower") if why in unsplit]),
            *([f"- A row without the split, its bytes beyond the sweep's largest message ({max(LARGE) / 1e6:g} MB): "
               "its allreduce alone is extrapolated (that message's time scaled up to the bytes), and "
               "its time on the wire came out below 0.9x of it, so the split is not given."]
              if "scaled" in unsplit else []), *([""] if unsplit else [])]


def round_split(r: dict) -> list[str]:
    """The traced `horovod-ring` runs' communication beyond one allreduce of their bytes, per fused
    round, beside the sweep's small message alone on the same layout; what the rounds' time off
    the wire held (fusion-buffer copies, Horovod's other work in a round, no round running)
    where the trace was read for it; with the CPU Open MPI's ranks keep busy in an allreduce
    alone, and Gloo's step on the same layouts. Not `horovod`: Open MPI's own choice of
    algorithm differs by message size, so its rounds are not one allreduce of all the bytes cut
    in parts. A run whose step came out at or below compute, update and one allreduce alone
    has no excess to split."""
    sweep = {(a["engine"], a["nodes"], a["per_node"], a["bytes"]): a for a in r["allreduce"]}
    rows, costs, times, layouts, split, none = [], {}, [], set(), [], []
    parts = ("copy_seconds", "round_other_seconds", "between_seconds")
    for t in r.get("timeline", []):
        alone, tl = alone_seconds(r, t), t["timeline"]
        if (t["engine"] != "horovod-ring" or alone is None or tl["rounds"] < 2
                or tl["wire_seconds"] < 0.9 * alone * t["backward_passes"]):
            continue  # one round, or a split not given (wire_split says why)
        # no more than the step spent beyond compute, update and one allreduce: a gap can hold
        # backward-pass time the probe already counts
        excess = (communication(t) - alone) * t["backward_passes"]
        if excess <= 0:
            none.append(f"{t['nodes']} x {t['per_node']} {t['flags']}".strip() + f" ({excess * 1e3:.0f} ms)")
            continue
        wire = tl["wire_seconds"] - alone * t["backward_passes"]  # per allreduce, as the timeline's
        gaps = tl["span_seconds"] - tl["wire_seconds"]
        per_round = max(0.0, min(wire + gaps, excess)) / tl["rounds"]
        costs.setdefault(t["ranks"] / r["cpus"], []).append(per_round)
        small = sweep.get((t["engine"], t["nodes"], t["per_node"], SMALL))
        times += [per_round / small["seconds"]] if small else []
        layouts.add((t["nodes"], t["per_node"]))
        split += [tl] if all(k in tl for k in parts) else []
        rows.append(f"| {t['engine']} | {t['nodes']} x {t['per_node']} | {t['ranks'] / r['cpus']:g} | "
                    f"{t['flags'] or '-'} | {tl['rounds']:g} | {wire * 1e3:.0f} | {gaps * 1e3:.0f} | "
                    + "".join(f"{tl[k] * 1e3:.0f} | " if k in tl else "- | " for k in parts)
                    + f"{excess * 1e3:.0f} | {per_round * 1e3:.0f} | "
                    + (f"{small['seconds'] * 1e3:.1f} |" if small else "- |"))
    if not rows:
        return []
    busy = {e: [a["cores_busy"] for k, a in sweep.items() if k[0] == e and k[1:3] in layouts
                and k[3] == max(LARGE) and "cores_busy" in a] for e in ("horovod-ring", "tf")}
    gloo = [communication(t) / a for t in r["train"] if t["engine"] == "gloo" and not t["flags"]
            and (t["nodes"], t["per_node"]) in layouts and (a := alone_seconds(r, t))]
    per_core = [f"{value_range([c * 1e3 for c in v], '.0f')} ms at {k:g} ranks per core" for k, v in sorted(costs.items())]
    found = [f"a fused round costs {'; '.join(per_core)}"]
    if times:
        found.append(f"{value_range(times, '.0f')}x the {SMALL / 1e3:g} kB allreduce alone on the same layout and links")
    if busy["horovod-ring"]:
        found.append(f"through a {max(LARGE) / 1e6:g} MB allreduce alone Open MPI's ranks kept "
                     f"{value_range(busy['horovod-ring'], '.2f')} of the cores busy on these layouts"
                     + (f", the tf engine's {value_range(busy['tf'], '.2f')} where measured" if busy["tf"] else ""))
    if gloo:
        found.append(f"Horovod over Gloo (not traced) spent {value_range(gloo, '.2f')}x one allreduce of its bytes per "
                     "step on these layouts")

    def ms(key: str) -> str:
        return value_range([x[key] * 1e3 for x in split], ".0f") + " ms"
    where = (f" Off the wire, in the {len(split)} of {len(rows)} runs read for it, a step spent "
             f"{ms('copy_seconds')} in fusion-buffer copies, {ms('round_other_seconds')} in the rounds' other work "
             f"and {ms('between_seconds')} between rounds with none running: Horovod waits there for every rank to "
             "hand it the next gradients (a backward pass still running on some rank, the sharing of the "
             f"{r['cpus']} cores, Horovod's cycle), which one rank's timeline cannot tell apart, and part of which "
             "is backward-pass time the compute probe already counts; the cores' sharing can take rank 0 off the "
             "CPU inside the copies and the rounds' other work too. Not measured: what each rank's backward "
             "pass did meanwhile, nor any of it where each rank has cores of its own, as on a GPU node."
             if split else " What a round spends that cost on is not measured here.")
    skipped = (f" Not in the table, no excess to split (the step at or below compute, update and one "
               f"allreduce alone): {', '.join(none)}." if none else "")
    return ["**Per fused round** (the traced `horovod-ring` runs with more than one round and a split; "
            "not `horovod`: Open MPI's own choice of algorithm differs by message size, the algorithm "
            "check below): Horovod allreduces what the backward pass has ready at each of its cycles, so "
            "a step's gradients go as several fused rounds. Their communication beyond one allreduce of "
            "the bytes: on the wire beyond it, and the gaps between the rounds (the first round's start "
            "to the last's end, less the time on the wire), per round, but no more than the step's excess "
            "(measured step - compute probe - update - one allreduce alone: a gap can hold backward-pass "
            f"time the probe counts); beside the sweep's {SMALL / 1e3:g} kB allreduce alone on the same "
            "layout and links. From rank 0's timeline, per step (medians), the rounds' time off the wire: "
            "the fusion-buffer copies in and out, the rest of the rounds (until their last tensor was "
            "marked done), and between one round's end and the next's start:", "",
            "| engine | nodes x ranks per node | ranks per core | flags | fused rounds | on the wire beyond one "
            "allreduce ms | gaps ms | copies ms | rounds' other work ms | between rounds ms | "
            f"the step's excess ms | per round ms | {SMALL / 1e3:g} kB allreduce alone ms |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
            "- Measured: " + "; ".join(found) + "."
            + (" A round costs more than the links' latency, which the small allreduce pays too."
               if times and min(times) > 3 else "") + where + skipped
            + " Runs the table does not hold (unsplit, one round, not traced) keep their excess unaccounted for.", ""]


def layout_order(a: dict) -> tuple:
    """A sweep row's place: by engine (as bench_comm sweeps them), layout, then size; layouts
    added by a later pass are listed with their engine's."""
    return engine_order(a["engine"]), a["nodes"], a["per_node"], a["bytes"]


def engine_order(engine: str) -> int:
    """An engine's place in ENGINES (those added later after them)."""
    return ENGINES.index(engine) if engine in ENGINES else len(ENGINES)


def worst_step(r: dict) -> dict:
    """Per engine (in the sweep's order), the largest flat-ring error of its trainer runs."""
    engines = sorted({t["engine"] for t in r["train"]}, key=engine_order)
    return {e: max(abs(t["error_flat"]) for t in r["train"] if t["engine"] == e) for e in engines}


def repeat_table(r: dict) -> list[str]:
    """Trainer runs repeated unchanged (bench_comm.REPEATED, in one pass, on one machine): how far
    the measured step, the compute probe and so the model's error move between identical runs."""
    groups: dict = {}
    for t in r.get("repeats", []):
        groups.setdefault((t["engine"], t["nodes"], t["per_node"], t["flags"]), []).append(t)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    rows, notes = [], []
    for (engine, nodes, per_node, flags), runs in groups.items():
        rows += [f"| {engine} | {nodes} x {per_node} | {flags or '-'} | {i} | {t['measured_step']:.3f} | "
                 f"{t['compute']:.3f} | {t['predicted_step_flat']:.3f} | {t['error_flat']:+.0%} |"
                 for i, t in enumerate(runs, 1)]
        steps, probes, errors = ([t[k] for t in runs] for k in ("measured_step", "compute", "error_flat"))
        step_apart, probe_apart = ((max(v) - min(v)) / statistics.median(v) for v in (steps, probes))
        missed, points = sum(abs(e) > 0.1 for e in errors), round((max(errors) - min(errors)) * 100)
        notes.append(
            f"- {engine} {nodes} x {per_node}{flags and ' ' + flags}, {len(runs)} identical runs: steps "
            f"{value_range(steps, '.2f')} s ({step_apart:.0%} apart), compute probes {value_range(probes, '.2f')} s "
            f"({probe_apart:.0%} apart), the model's error {value_range(errors, '+.0%', ' to ')} "
            f"({points} point{'' if points == 1 else 's'}); "
            + (f"{missed} of {len(runs)} beyond the 10% goal" if missed else "every one within the 10% goal")
            + "".join(f" (the step table's run of it: {t['error_flat']:+.0%})" for t in r.get("train", [])
                      if (t["engine"], t["nodes"], t["per_node"], t["flags"], t.get("machine"))
                      == (engine, nodes, per_node, flags, runs[0]["machine"]))
            + (": the probe moved more than the step did, and the error with it." if missed and probe_apart > 2 * step_apart
               and points > 100 * step_apart else "."))
    machines = sorted({t.get("machine", "-") for v in groups.values() for t in v})
    return [f"**Identical runs** ({'; '.join(machines)}; `bench_comm.REPEATED`): the same trainer run "
            "several times; per run: measured step, the slowest rank's compute probe, the flat ring's "
            "prediction and error:", "",
            "| engine | nodes x ranks per node | flags | run | measured step s | compute s | predicted s | error |",
            "|---|---|---|---:|---:|---:|---:|---:|", *rows, "", *notes, ""]


def section_comm(r: dict) -> list[str]:
    """The communication model on shaped rehearsal links: fit, allreduce check, trainer check."""
    fit, rounds = r["fit"], round_split(r)
    shown = (32_000, 1_000_000, 14_000_000, 28_000_000)
    def both(r: dict, key: str, scale: float, digits: int) -> str:
        return " | ".join(f"{r[f'{key}_{kind}'] * scale:.{digits}f} ({r[f'error_{kind}'] * 100:+.0f}%)"
                          for kind in ("flat", "hierarchical"))

    sweep = [f"| {a['engine']} | {a['nodes']} x {a['per_node']} | {a['bytes'] / 1e6:g} | {a['seconds'] * 1e3:.1f} | "
             f"{both(a, 'predicted', 1e3, 1)} | {a['cores_busy'] if 'cores_busy' in a else '-'} |"
             for a in sorted(r["allreduce"], key=layout_order) if a["bytes"] in shown and "error_flat" in a]
    train = [f"| {t['engine']} | {t['nodes']} x {t['per_node']} | {t['flags'] or '-'} | {t['gradient_bytes'] / 1e6:.1f} | "
             f"{t['compute']:.3f} | {t.get('update', 0.0):.3f} | {t['measured_step']:.3f} | "
             f"{both(t, 'predicted_step', 1, 3)} |" for t in r["train"]]
    return [
        f"## Communication model (rehearsal links shaped to {r['rate']})", "",
        f"Machine: {r['machine']}, {r['date']}"
        + (f" (the allreduce sweep and fit: {r['sweep_date']})" if r.get("sweep_date", r["date"]) != r["date"] else "")
        + f"; `bench/bench_comm.py`. Every node's link of the Slurm rehearsal shaped to {r['rate']} ({r['link_gbs'] * 1e3:.0f} MB/s) "
        "both ways (tc tbf); Horovod over MPI (`horovod`: srun --mpi=pmix), Horovod over Gloo "
        "(`gloo`: srun --mpi=none, each rank told its place as horovodrun --gloo would, "
        "bench/gloo_rank.py), Horovod over MPI with Open MPI told to run the exchange the ring model "
        "assumes (`horovod-ring`: recursive doubling on 2 ranks, the ring on more; `bench_comm.RING_RULES`, "
        "the algorithm check below says why) and the tf engine's ring (`tf`: srun), "
        "ranks in blocks over node1..node4. Ranks on one node share memory and loopback "
        "(unshaped, taken as free): predicted both as one flat ring over all ranks paced by the "
        "links (`projection.Network(hierarchical=False)`) and hierarchically (a ring across the "
        "nodes only); with 1 rank per node the two are the same. Errors: + means the model is "
        "slower than measured.", "",
        "**Fitted** (least squares of the ring model on the relative error, 1 rank per node, "
        "2-4 nodes, 1 kB to 28 MB):", "",
        "| engine | bandwidth (MB/s) | latency per ring step (us) | bandwidth / link rate |", "|---|---:|---:|---:|",
        *[f"| {e} | {f['bandwidth_gbs'] * 1e3:.1f} | {f['latency_us']:.0f} | {f['bandwidth_gbs'] / r['link_gbs']:.2f} |"
          for e, f in fit.items()], "",
        "**Allreduce, measured vs the fitted model** (median of the timed repeats; layouts with "
        "more than 1 rank per node are predictions, not fitted; cores busy: the CPU time of every "
        "rank in the timed allreduces over their wall time times the machine's cores, where "
        "measured: near 1, the shared CPU paced the allreduce, not the links):", "",
        "| engine | nodes x ranks per node | MB | measured ms | flat ring: ms (error) | hierarchical: ms (error) "
        "| cores busy |", "|---|---|---:|---:|---:|---:|---:|",
        *sweep, "",
        "**Training step, measured vs predicted**: the real trainer (DenseNet-121, and ResNet-50 "
        "where the flags say so, at 32 px: their real gradient bytes; synthetic input; a "
        "NAME=value among the flags whose NAME starts upper-case is a Horovod or Open MPI setting in "
        "the ranks' environment; "
        "the step model counts one allreduce of all the bytes); predicted = the slowest rank's "
        "compute probe "
        "(timed with every rank probing at once, so the 2 cores' contention is in it) + the "
        "fitted allreduce of the gradient bytes (halved by --fp16-allreduce) / backward passes "
        "per step + the optimizer's update, which the probe leaves out (update: one Adam step timed alone "
        + (f"on one thread, {', '.join(f'{m} {s * 1e3:.0f} ms' for m, s in r['update'].items())}, "
           if r.get("update") else "")
        + "slowed as the run's probe is over the model's with a core per rank, / backward passes per step):", "",
        "| engine | nodes x ranks per node | flags | gradient MB | compute s | update s | measured step s | "
        "flat ring: s (error) | hierarchical: s (error) |", "|---|---|---|---:|---:|---:|---:|---:|---:|", *train, "",
        *(["- Step model on the trainer runs, largest error of the flat ring: "
           + "; ".join(f"{e}: {goal(100 * worst, '<=', 10, '%')}" for e, worst in worst_step(r).items())
           + "; the error's parts below (communication beyond one allreduce for every run; fit, wire and "
           "the rest for the traced ones).", ""] if r["train"] else []),
        *repeat_table(r), *step_split(r), *wire_split(r, bool(rounds)), *rounds,
        *[f"- not measured: {f['engine']} {f['nodes']} x {f['per_node']} {f.get('flags', '')}: the run failed, "
          f"{first_error(f['error'])[:300]}" for f in r.get("failed", [])],
        *comm_notes(r), ""]


def section_inference(r: dict) -> list[str]:
    sp, au = r["speed"], r["small_cnn_mean_auroc"]
    rows = [f"| {name} | {v['latency_ms_batch1']:.1f} | {v['images_per_sec_batch32']:.1f} | "
            f"{v['images_per_sec_tencrop']:.1f} |" for name, v in sp.items()]
    return [
        "## Inference: TensorFlow vs OpenVINO FP32 / INT8 (DenseNet-121, 224 px)", "",
        f"Machine: {r['machine']}, {r['date']}; medians; OpenVINO with the f32 inference "
        "precision hint; INT8 by NNCF post-training quantisation on 300 images.", "",
        "| backend | latency, batch 1 (ms) | images/s, batch 32 | images/s with ten-crop |",
        "|---|---:|---:|---:|", *rows, "",
        f"- OpenVINO FP32 / TensorFlow, batch-32 throughput: {verdict(r['openvino_fp32_over_tf'], 2.5)}; "
        "batch-1 latency, TensorFlow / OpenVINO FP32: "
        f"{verdict(sp['tensorflow']['latency_ms_batch1'] / sp['openvino_fp32']['latency_ms_batch1'], 2.5)}. "
        "OpenVINO's FP32 lead is large at batch 1 and small at batch 32 on these 2 cores "
        "(not analysed further here).",
        f"- OpenVINO INT8 / FP32 (batch 32): {verdict(r['int8_over_fp32'], 2.0)}",
        f"- INT8 mean AUROC drop: {r['int8_auroc_drop']:+.4f} (goal within 0.005: "
        f"{'met' if abs(r['int8_auroc_drop']) <= 0.005 else 'MISSED'}); FP32 {au['fp32']:.4f}, INT8 "
        f"{au['int8']:.4f}, {au['n']} synthetic test images, small CNN. DenseNet-121 runs with "
        "random weights (nothing may download ImageNet weights, and this CPU cannot train it "
        "to a meaningful AUROC in a benchmark), so the AUROC check uses the trained small CNN.",
        "- Ten-crop costs about 10x the compute of one view: compare the last two columns. "
        "This CPU has AMX (int8 and bf16 tiles), which INT8 can use; how much of the gain "
        "that explains was not measured.", ""]


def section_nas(r: dict) -> list[str]:
    o, t = r["oracle"], r["throughput"]
    proposers = [name for name in ("random", "evolution", "llm") if name in o]
    task = r["task"]
    return [
        "## Architecture search (GenNAS space)", "",
        f"Machine: {r['machine']}, {r['date']}.", "",
        f"**Trials to a top-1% network of NAS-Bench-Macro** (CIFAR-10 mean accuracy >= "
        f"{o['target_mean_acc']:.2f}%, the 66th best of 6,561 codes), with the benchmark's scores "
        f"standing in for training; {o['seeds']} seeds per proposer:", "",
        "| proposer | median | quartiles | mean |", "|---|---:|---:|---:|",
        *[f"| {p} | {o[p]['median']:g} | {o[p]['q1']:g}-{o[p]['q3']:g} | {o[p]['mean']:.1f} |"
          for p in proposers], "",
        f"- evolution needs {o['random']['median'] / o['evolution']['median']:.1f}x fewer trials "
        "than random (median). The LLM proposer is measured only where an endpoint is configured "
        "(CHEXNET_LLM_BASE_URL); none is reachable from these machines"
        + (", so it is missing here." if "llm" not in o else "."), "",
        f"**Candidates per hour** on synthetic {task['image_size']}-px records ({task['images']:,} "
        f"images, {task['epochs']} epochs, batch {task['batch_size']}), every configuration "
        f"training the same {len(r['candidates'])} networks (trainer start-up included):", "",
        "| configuration | candidates | wall s | candidates/hour |", "|---|---:|---:|---:|",
        *[f"| {name} | {v['candidates']} | {v['seconds']:.0f} | {v['per_hour_wall']:.0f} |"
          for name, v in t.items()], "",
        f"- 2 workers / 1 worker, one core each (`--bind-cores`: one CPU rank per worker, its "
        f"input pipeline included, as one GPU per worker on a cluster): "
        f"{verdict(r['two_workers_over_one'], 1.8)}",
        f"- 1 worker given both cores (2 threads, unbound) / 1 worker on one core: "
        f"{r['one_worker_two_threads_over_one']:.2f}; two workers on the same two cores make "
        f"{r['two_workers_over_one'] / r['one_worker_two_threads_over_one']:.2f}x its candidates per hour "
        "(small models use two threads poorly, and the trainer's start-up is single-threaded)", "",
        f"A real evolution search, 2 workers, {r['evolution_search']['trials']} candidates in "
        f"{r['evolution_search']['seconds'] / 60:.1f} min (best mean validation AUROC "
        f"{r['evolution_search']['best']:.4f}): `tools/nas_report.py` output in "
        "[docs/nas/report.md](nas/report.md).", "",
        "![best so far](nas/best_so_far.png)", "", "![AUROC vs params](nas/pareto.png)", ""]


def goal(value: float, op: str, target: float, unit: str = "") -> str:
    """`value (goal <op> target: met|MISSED)`, for goals of at most or under a target."""
    met = value <= target if op == "<=" else value < target
    return f"{value:.2f}{unit} (goal {op} {target:g}{unit}: {'met' if met else 'MISSED'})"


def _first_batch(s: dict) -> float:
    """Seconds to the first batch of the slower of the ranks measured."""
    return max(p["first_batch_seconds"] for p in s["pipeline"].values())


def _pipeline_cost(s: dict) -> float:
    """CPU-seconds per image of the input pipeline, mean of the ranks measured."""
    return sum(1 / p["images_per_cpu_second"] for p in s["pipeline"].values()) / len(s["pipeline"])


def _bootstrap_cost(s: dict) -> float:
    """CPU-seconds per test image and resample of the patient bootstrap."""
    b = s["bootstrap"]
    return b["cpu_seconds"] / (b["images"] * b["resamples"])


# (short name, row label, the cell at one size, the cost per item at one size)
SCALE_TIMES = [
    ("records conversion", "records conversion, 2 workers: wall s (CPU ms per image)",
     lambda s: f"{s['convert']['seconds']:.0f} ({1e3 * s['convert']['cpu_seconds'] / s['images']:.2f})",
     lambda s: s["convert"]["cpu_seconds"] / s["images"]),
    ("listing and manifest", "listing, split, leak guard, shard plan and manifest: s (us per image)",
     lambda s: f"{s['table']['seconds']:.2f} ({1e6 * s['table']['seconds'] / s['images']:.0f})",
     lambda s: s["table"]["seconds"] / s["images"]),
    ("input pipeline", "input pipeline, one rank of 16, steady: images per CPU-second (wall img/s)",
     lambda s: f"{1 / _pipeline_cost(s):,.0f} ({min(p['images_per_sec'] for p in s['pipeline'].values()):,.0f})",
     _pipeline_cost),
    ("patient bootstrap", "test-split patient bootstrap: CPU s per 100 resamples (us per image and resample)",
     lambda s: f"{100 * s['bootstrap']['cpu_seconds'] / s['bootstrap']['resamples']:.1f} ({1e6 * _bootstrap_cost(s):.1f})",
     _bootstrap_cost),
    ("scaling report", "`tools/scaling_report.py`, 16-rank 100-epoch run log: s (CPU ms per log line)",
     lambda s: f"{s['report']['seconds']:.2f} ({1e3 * s['report']['cpu_seconds'] / s['report']['lines']:.1f})",
     lambda s: s["report"]["cpu_seconds"] / s["report"]["lines"]),
]
# (short name, row label, peak RSS in MB at one size)
SCALE_MEMORY = [
    ("records main process", "records conversion: main process", lambda s: s["convert"]["main_rss_mb"]),
    ("records worker", "records conversion: each worker process (the largest)", lambda s: s["convert"]["worker_rss_mb"]),
    ("listing and manifest", "listing, split, plan and manifest", lambda s: s["table"]["peak_rss_mb"]),
    ("input pipeline", "input pipeline, one rank of 16", lambda s: max(p["peak_rss_mb"] for p in s["pipeline"].values())),
    ("patient bootstrap", "test-split patient bootstrap", lambda s: s["bootstrap"]["peak_rss_mb"]),
    ("scaling report", "`tools/scaling_report.py`", lambda s: s["report"]["peak_rss_mb"]),
]


def section_scale(r: dict) -> list[str]:
    """Costs against data size, up to the full NIH set (bench/bench_scale.py): a time table, a
    memory table, and each goal as a bullet."""
    sizes = list(r["sizes"].values())
    full = max(r["sizes"], key=int)
    big = r["sizes"][full]
    head = "| measure | " + " | ".join(f"{s['images']:,} images" for s in sizes)
    lines = [
        "## Costs against data size, up to the full NIH set", "",
        f"Machine: {r['machine']}, {r['date']}. Synthetic NIH-like sets (`bench/bench_scale.py`; "
        f"{r['image_px']} px images: the costs here are per image and per record, not per pixel), each "
        "with NIH's patient structure (3.64 images per patient on average) and official split sizes "
        f"(test: {big['test_images']:,} images at the full size). Pipeline: `data.train_dataset` of "
        f"ranks 0 and 15 at world size {r['world_size']}, each in a fresh process, 2 threads, batch 16, "
        f"{r['batches']} timed batches. Costs per item in CPU time (the process's, its workers "
        "included), but the listing and manifest's (one thread) in wall time.", "",
        head + " | per item, worst size / smallest |", "|---|" + "---:|" * len(sizes) + "---:|"]
    worst = {}
    one_log = len({s["report"]["lines"] for s in sizes}) == 1  # the report's work is the same at every size
    for name, label, cell, cost in SCALE_TIMES:
        costs = [cost(s) for s in sizes]
        ratio = max(c / costs[0] for c in costs)
        if not (one_log and name == "scaling report"):
            worst[name] = ratio
        lines.append(f"| {label} | {' | '.join(cell(s) for s in sizes)} | {ratio:.2f} |")
    lines.insert(-2, f"| input pipeline, one rank of 16: seconds to the first batch (slower of ranks 0 and 15) | "
                 f"{' | '.join(f'{_first_batch(s):.2f}' for s in sizes)} | |")
    lines += ["", head + " | largest / smallest |", "|---|" + "---:|" * len(sizes) + "---:|"]
    growth, per_row = {}, {}
    for name, label, mb in SCALE_MEMORY:
        mbs = [mb(s) for s in sizes]
        growth[name] = mbs[-1] / mbs[0]
        per_row[name] = (mbs[-1] - mbs[0]) * 2**20 / (sizes[-1]["images"] - sizes[0]["images"])
        lines.append(f"| peak RSS (MB), {label} | {' | '.join(f'{m:,.0f}' for m in mbs)} | {growth[name]:.2f} |")
    growing = [n for n in ("records main process", "listing and manifest") if growth[n] > 1.2]
    lines += [
        "",
        "- Time per item, worst size / smallest size: "
        + "; ".join(f"{name}: {goal(v, '<=', 1.2)}" for name, v in worst.items()) + ".",
        *([f"- The scaling report reads the same {big['report']['lines']}-line run log at every size (a run log "
           "grows with epochs and attempts, not with images): no goal per item; its ratio in the table is "
           f"the run-to-run spread of a {big['report']['seconds']:.2f} s command, most of it Python's start."]
          if one_log else []),
        f"- First batch at the full size: {goal(_first_batch(big), '<', 10, ' s')}.",
        "- Peak memory, largest / smallest size (flat: at most 1.2): "
        + "; ".join(f"{name}: {goal(v, '<=', 1.2)}" for name, v in growth.items()) + ".",
        *([f"- Where memory grows ({', '.join(growing)}): by {', '.join(f'{per_row[n]:,.0f}' for n in growing)} "
          "bytes per listed image: the listing's one table (a row of names, path, patient, split, view and "
          "float32 label/mask cells per CSV row, about 0.5 kB, which the split, leak guard and manifest read; "
          "no copy of it per source, split or shard) and the shard plan's rows (a tuple and two array views "
          f"each); no step holds an image or a record. At {big['images']:,} images: "
          f"{', '.join(f'{mb(big):,.0f} MB' for n, _, mb in SCALE_MEMORY if n in growing)}. Flat memory would "
          "need a listing never held whole (the CSV streamed, the split drawn from patient ids alone): not "
          "built."] if growing else []),
        f"- Records conversion of the full {big['images']:,} images: {big['convert']['seconds']:.0f} s wall on "
        f"{big['convert']['workers']} workers, {big['records_bytes'] / 1e6:,.0f} MB of records.",
        f"- The bootstrap's cost is linear in its resamples: evaluate's default 1,000 over the full test "
        f"split ({big['bootstrap']['patients']:,} patients) costs {1000 * big['bootstrap']['cpu_seconds'] / big['bootstrap']['resamples']:,.0f} CPU s here."]
    if "evaluate" in big:
        ev = big["evaluate"]
        lines.append(
            f"- `python -m chexnet_hvd.evaluate` end to end at {big['images']:,} images (test split "
            f"{big['test_images']:,}, validation split {big['splits']['val']:,} for the operating points, "
            f"small CNN, 1 process, {ev['resamples']:,} bootstrap resamples): {ev['seconds']:.0f} s wall, "
            f"{ev['cpu_seconds']:.0f} CPU s, peak RSS {ev['peak_rss_mb']:,.0f} MB.")
    return lines + [""] + r.get("notes", [])


# Each benchmark's JSON, its section's title and the function making the section, in page order.
SECTIONS = {
    "bench_train.json": ("The trainer's cost per step", section_trainer),
    "bench_data.json": ("Data path: records conversion and input pipelines", section_data_path),
    "bench_scaling.json": ("Scaling on this machine", section_scaling),
    "bench_comm.json": ("Communication model", section_comm),
    "bench_inference.json": ("Inference: TensorFlow vs OpenVINO FP32 / INT8", section_inference),
    "bench_nas.json": ("Architecture search (GenNAS space)", section_nas),
    "bench_scale.json": ("Costs against data size, up to the full NIH set", section_scale),
}
GOAL = re.compile(r": ([-+]?[0-9][0-9.,]*(?: s|%)?) \(goal (>=|<=|<|within) ([0-9.]+(?: s|%)?): (met|MISSED)\)")


def goals(lines: list[str], r: dict) -> list[str]:
    """A summary row for every `label: value (goal ...: met|MISSED)` in a section's bullet
    lines, under the heading it stands under. In a bullet `what: a: value (goal ...); b: ...`,
    b's row is labelled `what: b` like a's."""
    rows, heading = [], ""
    for line in lines:
        if line.startswith("## "):
            heading = line[3:].split(" (")[0]
        if not line.startswith("- "):
            continue
        end, context = 2, ""
        for m in GOAL.finditer(line):
            label = re.sub(r"\s*\([^()]*\)", "", line[end:m.start()])  # asides in brackets
            label = re.split(r"[.;] ", label)[-1].strip(" ,")
            if end == 2 and ": " in label:
                context = label.rsplit(": ", 1)[0]
            elif context:
                label = f"{context}: {label}"
            end = m.end()
            value, op, target, met = m.groups()
            rows.append(f"| {heading}: {label} | {value} | {op} {target}: "
                        f"{met if met == 'met' else '**missed**'} | {r['machine']} | {r['date']} |")
    return rows


def measured(name: str, title: str, section) -> tuple[list[str], list[str]]:
    """A section's lines and goal rows from PAGE_DIR/name; or, when the benchmark has not
    written it, or an older version of the benchmark wrote it without a figure the section now
    shows, the section's heading saying so (the rest of the page is still rendered)."""
    script = f"`bench/{name.replace('.json', '.py')}`"
    if not (PAGE_DIR / name).is_file():
        return [f"## {title}", "", f"Not measured yet: {script} has not written {name}.", ""], []
    r = json.loads((PAGE_DIR / name).read_text())
    try:
        lines = section(r)
    except KeyError as missing:
        return [f"## {title}", "", f"Not measured yet by the current {script}: its {name} of "
                f"{r.get('date', 'an unknown date')} has no {missing} (written by an older version).", ""], []
    return lines, goals(lines, r)


def render() -> str:
    """The page, from the JSON results in PAGE_DIR."""
    sections, summary = [], []
    for name, (title, section) in SECTIONS.items():
        lines, rows = measured(name, title, section)
        sections += lines
        summary += rows
    runs = json.loads((PAGE_DIR / "bench_runs.json").read_text()) if (PAGE_DIR / "bench_runs.json").is_file() else None
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (bench/run_all.py) from `docs/bench_*.json`; never typed by hand.",
             "Each benchmark measures its ratios within one run on one machine (these machines are",
             "shared and noisy: compare ratios, not absolute numbers across machines).", "",
             "## Goals", "",
             "Every goal on this page, with the machine and date of its measurement:", "",
             "| figure | value | goal | machine | date |", "|---|---:|---|---|---|", *summary, "",
             *sections,
             "## Not yet measured", "",
             "- GPU numbers: no GPU was available where this page was measured (the GPU code paths "
             "are written and exercised on CPU where the logic allows).", ""]
    if runs:
        lines += ["## How long `make bench` takes", "",
                  f"Machine: {runs['machine']}, {runs['date']}: {runs['seconds'] / 60:.0f} minutes in all"
                  + (" (--quick)" if runs.get("quick") else "") + ".", "",
                  "| benchmark | minutes |", "|---|---:|",
                  *[f"| `bench/{name}` | {sec / 60:.1f}"
                    + (f" (failed: exit {runs['failed'][name]})" if name in runs.get("failed", {}) else "") + " |"
                    for name, sec in runs["benchmarks"].items()], ""]
    return "\n".join(lines)


def run_benchmarks(quick: bool) -> dict:
    """Every benchmark in its own process, writing into PAGE_DIR; their wall times and the exit
    codes of those that failed (the others still run: an hour's run is not lost to one)."""
    times, failed, t0 = {}, {}, time.perf_counter()
    for script, quick_flags in BENCHMARKS.items():
        flags = ["--out", str(PAGE_DIR / script.replace(".py", ".json"))]
        flags += [f.format(dir=PAGE_DIR) for f in OUTPUT_FLAGS.get(script, [])]
        print(f"== {script}", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, str(ROOT / "bench" / script), *flags, *(quick_flags if quick else [])],
                              cwd=ROOT).returncode
        times[script] = time.perf_counter() - started
        if code:
            failed[script] = code
            print(f"== {script} failed: exit {code}", file=sys.stderr, flush=True)
    return {"machine": machine(), "date": today(), "quick": quick,
            "seconds": time.perf_counter() - t0, "benchmarks": times, "failed": failed}


def main() -> None:
    global PAGE_DIR
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render", action="store_true", help="only render the page from existing JSON")
    ap.add_argument("--quick", action="store_true", help="a smoke run of every benchmark at small "
                    "sizes, written to a scratch folder (docs/ is left alone)")
    ap.add_argument("--out-dir", default=None, help="where the results and the page go (default: "
                    "docs/; with --quick a new scratch folder)")
    args = ap.parse_args()
    PAGE_DIR = Path(args.out_dir or (tempfile.mkdtemp(prefix="bench-quick-") if args.quick else DOCS))
    PAGE_DIR.mkdir(parents=True, exist_ok=True)
    runs = None
    if not args.render:
        runs = run_benchmarks(args.quick)
        (PAGE_DIR / "bench_runs.json").write_text(json.dumps(runs, indent=1))
    (PAGE_DIR / "benchmarks.md").write_text(render())
    print(f"wrote {PAGE_DIR / 'benchmarks.md'}")
    if runs and runs["failed"]:
        sys.exit(f"error: bench/run_all.py: failed: {', '.join(runs['failed'])}")


if __name__ == "__main__":
    main()
