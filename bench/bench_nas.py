#!/usr/bin/env python3
"""Architecture search: how fast proposers find good networks, and how many candidates per hour
1 vs 2 workers train on this machine.

    .venv/bin/python bench/bench_nas.py [--seeds 50] [--trials 12] [--out docs/bench_nas.json]

1. Oracle: NAS-Bench-Macro's CIFAR-10 mean accuracies stand in for training; trials each
   proposer needs until one scores in the top 1% (>= 92.81%), over --seeds seeds. The LLM
   proposer joins when CHEXNET_LLM_BASE_URL and CHEXNET_LLM_MODEL name an endpoint.
2. Throughput: real searches (`python -m chexnet_hvd.nas`) on synthetic 32-px records, each study
   given the same --trials candidates in the same order (enqueued up front, so every
   configuration trains the same networks): 1 worker on 1 core, 2 workers on 1 core each
   (--bind-cores: one CPU rank per worker, input pipeline included, as one GPU per worker on a
   cluster), and 1 worker with 2 threads and no binding.
3. A real evolution search with 2 workers, --search-trials candidates; tools/nas_report.py turns
   it and the throughput studies into docs/nas/ (report.md, trials.csv and the plots the README
   embeds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, today  # noqa: E402

BENCH = ROOT.parent / "shared" / "data" / "nas-bench-macro" / "nas-bench-macro_cifar10.json"
PY = sys.executable

from chexnet_hvd.nas import proposers, report, space, study  # noqa: E402
from chexnet_hvd.nas.__main__ import NasConfig, task_of  # noqa: E402

TASK = {"image_size": 32, "batch_size": 32, "epochs": 2}


def oracle_runs(seeds: int) -> dict:
    """Trials to a top-1% architecture per seed, per proposer."""
    oracle = {code: entry["mean_acc"] for code, entry in json.loads(BENCH.read_text()).items()}
    target = proposers.top_threshold(oracle)
    chosen = [proposers.RandomProposer(), proposers.EvolutionProposer()]
    if os.environ.get("CHEXNET_LLM_BASE_URL") and os.environ.get("CHEXNET_LLM_MODEL"):
        chosen.append(proposers.make_proposer("llm", log_path=Path(tempfile.mkdtemp()) / "llm.jsonl"))
    out = {"target_mean_acc": target, "seeds": seeds}
    for p in chosen:
        trials = [proposers.trials_to_target(p, oracle, target, seed) for seed in range(seeds)]
        q = statistics.quantiles(trials, n=4)
        out[p.name] = {"median": statistics.median(trials), "q1": q[0], "q3": q[2],
                       "mean": statistics.mean(trials), "trials": trials}
        print(f"oracle {p.name}: median {out[p.name]['median']} trials", flush=True)
    return out


def make_records(tmp: Path) -> Path:
    subprocess.run([PY, "-m", "chexnet_hvd.synthetic", "--out", tmp / "syn", "--images", "1200",
                    "--size", "32", "--seed", "4"], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([PY, "-m", "chexnet_hvd.records", "--csv", tmp / "syn" / "Data_Entry_2017.csv",
                    "--images", tmp / "syn" / "images", "--out", tmp / "records", "--shard-size",
                    "128", "--no-progress"], check=True, cwd=ROOT, capture_output=True)
    return tmp / "records"


def search(study_dir: Path, records: Path, trials: int, workers: int, threads: int, bind: bool,
           enqueue: list[str] = ()) -> float:
    """One search as users run it; `enqueue` fixes its candidates. Its wall seconds."""
    args = ["--study-dir", str(study_dir), "--data", str(records), "--n-trials", str(trials),
            "--workers", str(workers), "--threads", str(threads),
            "--bind-cores" if bind else "--no-bind-cores",
            *[str(x) for k, v in TASK.items() for x in (f"--{k.replace('_', '-')}", v)]]
    if enqueue:
        cfg = NasConfig(study_dir=str(study_dir), data=str(records), **TASK)
        the_study = study.open_study(study_dir, task=task_of(cfg))
        for code in enqueue:
            the_study.enqueue_trial(study.params_of(code), user_attrs={"proposer": "fixed"})
    t0 = time.perf_counter()
    subprocess.run([PY, "-m", "chexnet_hvd.nas", *args], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--trials", type=int, default=12, help="candidates per throughput study")
    ap.add_argument("--search-trials", type=int, default=20, help="candidates of the evolution search")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_nas.json"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "nas"))
    args = ap.parse_args()

    result = {"machine": machine(), "date": today(),
              "oracle": oracle_runs(args.seeds), "task": TASK | {"images": 1200}}
    rng = random.Random(11)
    codes = []
    while len(codes) < args.trials:
        code = "".join(rng.choice("012") for _ in range(space.NUM_LAYERS))
        if space.canonical(code) not in {space.canonical(c) for c in codes}:
            codes.append(code)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = make_records(tmp)
        configs = {"1 worker, 1 core": (1, 1, True), "2 workers, 1 core each": (2, 1, True),
                   "1 worker, 2 threads, unbound": (1, 2, False)}
        studies, throughput = {}, {}
        for name, (workers, threads, bind) in configs.items():
            study_dir = tmp / f"{workers}w{threads}t"
            seconds = search(study_dir, records, args.trials, workers, threads, bind, codes)
            rows = study.results(study.open_study(study_dir))
            studies[name] = rows
            stats = report.throughput(rows)
            throughput[name] = {"workers": workers, "threads": threads, "bound": bind, "seconds": seconds,
                                "candidates": stats["candidates"], "per_hour": stats["per_hour"],
                                "per_hour_wall": 3600 * stats["candidates"] / seconds}
            print(f"{name}: {stats['candidates']} candidates in {seconds:.0f} s", flush=True)
        evo_dir = tmp / "evolution"
        evo_seconds = search(evo_dir, records, args.search_trials, 2, 1, True)
        studies["evolution search, 2 workers"] = study.results(study.open_study(evo_dir))
        subprocess.run([PY, str(ROOT / "tools" / "nas_report.py"), str(evo_dir), "--out", args.report],
                       check=True, cwd=ROOT, capture_output=True)
        report.write_csv(studies, Path(args.report) / "throughput_trials.csv")
        (Path(args.report) / "throughput.md").write_text(report.throughput_table(
            {k: v for k, v in studies.items() if k in configs}) + "\n")
    one = throughput["1 worker, 1 core"]["per_hour_wall"]
    result |= {"candidates": codes, "throughput": throughput,
               "two_workers_over_one": throughput["2 workers, 1 core each"]["per_hour_wall"] / one,
               "one_worker_two_threads_over_one": throughput["1 worker, 2 threads, unbound"]["per_hour_wall"] / one,
               "evolution_search": {"trials": args.search_trials, "seconds": evo_seconds,
                                    "best": max((r["auroc"] for r in studies["evolution search, 2 workers"]
                                                 if r["auroc"] is not None), default=None)}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "oracle"}, indent=1))


if __name__ == "__main__":
    main()
