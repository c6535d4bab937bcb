"""What to run on a first GPU node before a week of training: is this stack ready?

    python -m chexnet_hvd.check                       # one rank per visible GPU (2 CPU ranks without)
    python -m chexnet_hvd.check --model small_cnn --image-size 32 --steps 6   # a quick look

One line per check, `[PASS]`, `[WARN]` or `[FAIL]`: the TensorFlow version, how the engine was
built (Horovod: with NCCL for GPU allreduce?), the GPUs TensorFlow sees, then the real trainer
on synthetic input for each precision, started by the engine's launcher (horovodrun, or
chexnet_hvd.launch for --engine tf), which shows that every rank got a GPU of its own and the
images/s per GPU. Without GPUs it says so and still runs the steps on the CPU. Exit 0 when
nothing failed, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from chexnet_hvd import cli, config, distributed, synthetic
from chexnet_hvd.placement import visible_gpus
from chexnet_hvd.records import writer
from chexnet_hvd.runlog import read_runlog


@dataclasses.dataclass
class CheckConfig:
    model: str = cli.field("densenet121", help="model to time (any the trainer builds)")
    image_size: int = cli.field(224, help="input side in pixels", minimum=1)
    batch_size: int = cli.field(32, help="images per GPU (rank) per step", minimum=1)
    steps: int = cli.field(20, help="training steps per precision (the first 5 are not timed)",
                           minimum=2)
    precisions: list[str] = cli.field(["fp32", "mixed_float16"], help="precisions to time")
    ranks: int = cli.field(0, help="ranks to start; 0: one per visible GPU, 2 without GPUs",
                           minimum=0)
    engine: str = distributed.engine_field("the distribution engine to check")


def line(verdict: str, text: str) -> str:
    print(f"[{verdict}] {text}", flush=True)
    return verdict


def stack(engine: str) -> list[str]:
    """Versions, the engine's build, the GPUs TensorFlow sees; one verdict each."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    verdicts = [line("PASS", f"TensorFlow {tf.__version__} (CUDA build: {tf.test.is_built_with_cuda()})")]
    verdicts += [line(*found) for found in distributed.engine_class(engine).build()]
    if gpus:
        verdicts.append(line("PASS", f"TensorFlow sees {len(gpus)} GPU(s): "
                                     f"{', '.join(g.name for g in gpus)}"))
    else:
        where = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        verdicts.append(line("FAIL", f"no GPU found (TensorFlow sees none; CUDA_VISIBLE_DEVICES={where}; "
                                     f"nvidia-smi lists {len(visible_gpus())}): the steps below run "
                                     "on the CPU"))
    return verdicts


def synthetic_records(root: Path, size: int) -> Path:
    """A tiny records set: the trainer needs a manifest and a validation split."""
    with contextlib.redirect_stdout(io.StringIO()):  # their own reports are not checks
        synthetic.main(["--out", str(root / "syn"), "--images", "64", "--size", str(min(size, 64)),
                        "--seed", "0"])
        writer.main(["--csv", str(root / "syn" / "Data_Entry_2017.csv"), "--images",
                      str(root / "syn" / "images"), "--out", str(root / "records"),
                      "--workers", "1", "--no-progress"])
    return root / "records"


def time_precision(cfg: CheckConfig, data: Path, run_dir: Path, ranks: int,
                   precision: str) -> tuple[dict | None, dict | None, str | None]:
    """The trainer itself under the engine's launcher, on one in-memory batch (synthetic input:
    any number of ranks and any batch, whatever the tiny records set holds): its run log's start
    (where the ranks ran, also when the timing then failed), its epoch, and the error if any."""
    run = config.TrainConfig(data=str(data), run_dir=str(run_dir), model=cfg.model,
                             image_size=cfg.image_size, batch_size=cfg.batch_size, epochs=1,
                             steps_per_epoch=cfg.steps, timing_warmup_steps=min(5, cfg.steps - 1),
                             synthetic_input=True, precision=precision, verbose=0, engine=cfg.engine)
    cmd = [*distributed.engine_class(cfg.engine).launcher(ranks), *config.command(run)]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = read_runlog(run_dir) if (run_dir / "runlog.jsonl").is_file() else []
    start = next((r for r in log if r["event"] == "start"), None)
    epochs = [r for r in log if r["event"] == "epoch"]
    if proc.returncode != 0 or not epochs:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return start, None, f"exit {proc.returncode}: {tail[0][:300]}"
    return start, epochs[-1], None


def placement_verdict(start: dict) -> str:
    """One GPU per rank: distinct devices within every host."""
    by_host = defaultdict(list)
    for r in start["ranks"]:
        by_host[r["host"]].append(r["gpu"])
    layout = "; ".join(f"{h}: {','.join(str(g) for g in gs)}" for h, gs in sorted(by_host.items()))
    started = f"{start['world_size']} ranks of the {start['engine']} engine"
    if all(g is None for gs in by_host.values() for g in gs):
        return line("WARN", f"{started}; no GPUs to give them")
    if any(None in gs or len(set(gs)) < len(gs) for gs in by_host.values()):
        return line("FAIL", f"ranks share or lack a GPU ({layout}): start one rank per GPU")
    return line("PASS", f"{started}, each on its own GPU ({layout})")


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(CheckConfig, __doc__, argv, prog="python -m chexnet_hvd.check")
    verdicts = stack(cfg.engine)
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    ranks = cfg.ranks or gpus or 2
    device = "GPU" if gpus else "CPU rank"
    rates, placed = {}, False
    with tempfile.TemporaryDirectory(prefix="chexnet-check-") as tmp:
        data = synthetic_records(Path(tmp), cfg.image_size)
        for precision in cfg.precisions:
            what = f"{cfg.model} {cfg.image_size} px {precision}, batch {cfg.batch_size} per {device}"
            start, epoch, error = time_precision(cfg, data, Path(tmp) / precision, ranks, precision)
            if start and not placed:  # where the ranks ran, even if their timing failed
                verdicts.append(placement_verdict(start))
                placed = True
            if error:
                verdicts.append(line("FAIL", f"{what}: the trainer failed ({error})"))
                continue
            rates[precision] = epoch["images_per_sec_per_rank"]
            vs = (f", {rates[precision] / rates['fp32']:.2f}x fp32"
                  if precision != "fp32" and rates.get("fp32") else "")
            verdicts.append(line("PASS", f"{what}: {rates[precision]:.1f} img/s per {device}, "
                                         f"{cfg.steps} steps{vs}"))
    failed = verdicts.count("FAIL")
    print(f"verdict: {'ready for GPU training' if not failed else f'{failed} check(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
