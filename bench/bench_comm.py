#!/usr/bin/env python3
"""The communication model, measured: on the Slurm rehearsal (tools/slurm_local.sh) with every
node's link shaped to --rate, allreduce time against message size and rank count for Horovod
(over MPI, srun --mpi=pmix: with Open MPI's own choice of allreduce algorithm, and as
`horovod-ring` with the exchange the ring model assumes, RING_RULES; over Gloo) and the tf engine
(its ring, srun --mpi=none), ranks spread over the 4 nodes; the ring model's latency and bandwidth fitted to the 1-rank-per-node runs
(chexnet_hvd.projection.fit_ring) and checked on the others; then the step-time model
(compute + allreduce of the real model's gradient bytes, fp16 halving them, backward passes per
step dividing them) against the real trainer on the same links, and Horovod's timeline of the
Horovod runs in TIMELINE: how much of a step is on the wire, in how many fused rounds, and what
of the rest is fusion-buffer copies, the rounds' other work, and time between rounds; the
runs in REPEATED again, unchanged: how far an identical run's step and probe move; last,
the rate check: a 28 MB allreduce on 2 and 4 nodes at 100, 200 and 400 Mbit/s, whether its growth with the node
count is the ring's at every link rate (--rates-only: that alone); and the algorithm check: Horovod
over MPI's 28 MB allreduce on 2 and 4 nodes with Open MPI choosing its allreduce algorithm and
with each of ALGORITHMS forced, which the ring model assumes (--algorithms-only: that alone).

    .venv/bin/python bench/bench_comm.py [--rate 200mbit] [--out docs/bench_comm.json]   (root; ~2 hours)

The trainer runs DenseNet-121 (its 7.0 M parameters: 27.8 MB of fp32 gradients) and, on 1 rank
per node, ResNet-50 (23.6 M: 94 MB, beyond Horovod's 64 MB fusion buffer; once more with a
128 MB buffer: whether a buffer that holds all the bytes changes the step) at 32 px, so the
compute is small beside the allreduce; the compute each step needs is the trainer's own
compute probe (every rank, all at once, so the 2 cores' contention is in it) and the optimizer's
update, which the probe leaves out (bench/update_worker.py: over half the probe at 32 px). Ranks on one node
share memory (unshaped): with several per node the flat ring still crosses each node's link
once per step, so the model for the CPU engines is one ring over all ranks paced by the links.
Holds /tmp/chexnet-rehearsal.lock and /tmp/chexnet-heavy.lock throughout (but not a second
time when a process it runs under holds one: `flock /tmp/chexnet-heavy.lock make bench`);
restores the links.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PY = sys.executable
sys.path.insert(0, str(ROOT))

from common import YIELD, locked, machine, rate_gbs, today  # noqa: E402

from chexnet_hvd import projection  # noqa: E402
from chexnet_hvd.runlog import read_runlog  # noqa: E402

NODES = [f"node{i}" for i in range(1, 5)]
SIZES = (1e3, 3.2e4, 1e6, 1.4e7, 2.8e7)  # bytes; 14 / 28 MB: DenseNet-121 fp16 / fp32
# (engine, nodes, ranks per node) of the allreduce sweep; the 1-per-node ones are fitted
SWEEP = [("horovod", 2, 1), ("horovod", 4, 1), ("horovod", 4, 2), ("horovod", 4, 4), ("tf", 2, 1), ("tf", 4, 1),
         ("tf", 4, 2), ("tf", 4, 4), ("gloo", 2, 1), ("gloo", 4, 1), ("gloo", 4, 2),
         ("horovod-ring", 2, 1), ("horovod-ring", 4, 1), ("horovod-ring", 4, 2)]
# the rate check: a 28 MB allreduce on 2 and 4 nodes (1 rank each), every engine, at each rate
RATES, RATE_CHECK_BYTES = ("100mbit", "200mbit", "400mbit"), 2.8e7
# Open MPI's allreduce algorithms (coll_tuned_allreduce_algorithm) the algorithm check forces
ALGORITHMS = {"recursive doubling": 3, "ring": 4, "rabenseifner": 6}
# `horovod-ring`: Horovod over MPI with Open MPI's allreduce told by this rules file
# (coll_tuned_dynamic_rules_filename) to run the exchange the ring model assumes: recursive
# doubling on 2 ranks (the same bytes as a 2-rank ring; the algorithm check's median there was
# the link rate's, the ring's was not, though single repeats of both took up to twice as long)
# and the ring on 3 or more, at every message size. Lines: collectives (1); allreduce's id
# (2); communicator sizes (2); per size: the size, message sizes (1), "from-bytes algorithm
# fan-out segment".
RING_RULES = "1\n2\n2\n2\n1\n0 3 0 0\n3\n1\n0 4 0 0\n"
CYCLE_MS = 20  # HOROVOD_CYCLE_TIME of the cycle check (ms)
BRIDGE_ADDRESS = "10.231.0.1"  # this machine on the rehearsal's bridge (tools/slurm_local.sh)
# (engine, nodes, ranks per node, extra trainer flags) of the step-time check; a NAME=value
# among the flags whose NAME starts upper-case goes to the ranks' environment instead (Horovod's
# and Open MPI's settings)
TRAIN = [("horovod", 2, 1, ()), ("horovod", 4, 1, ()), ("horovod", 4, 2, ()), ("horovod", 4, 4, ()),
         ("horovod", 4, 1, ("--fp16-allreduce",)), ("horovod", 4, 1, ("--backward-passes-per-step", "2")),
         ("tf", 2, 1, ()), ("tf", 4, 1, ()), ("tf", 4, 2, ()), ("tf", 4, 4, ()),
         ("gloo", 2, 1, ()), ("gloo", 4, 1, ()), ("gloo", 4, 2, ()),
         *[(engine, nodes, 1, ("--model", "resnet50")) for engine, nodes in (("horovod", 2), ("horovod", 4), ("tf", 4))],
         ("horovod", 4, 1, ("--model", "resnet50", f"HOROVOD_FUSION_THRESHOLD={128 << 20}")),
         *[("horovod-ring", nodes, per_node, ()) for nodes, per_node in ((2, 1), (4, 1), (4, 2))],
         ("horovod-ring", 4, 1, ("--fp16-allreduce",)), ("horovod-ring", 4, 1, ("--backward-passes-per-step", "2")),
         *[("horovod-ring", nodes, 1, ("--model", "resnet50")) for nodes in (2, 4)],
         # whether a longer delay between Horovod's tensor fusion cycles (each negotiating what the
         # ranks have ready) changes the step or the 16-rank probe
         *[(engine, 4, per_node, (f"HOROVOD_CYCLE_TIME={CYCLE_MS}",))
           for engine, per_node in (("horovod-ring", 1), ("horovod", 1), ("horovod", 4))],
         # whether Open MPI's ranks polling at full speed while they wait spread the 16-rank
         # probes: srun gives Open MPI no sign that its ranks share cores, so it does not yield on
         # its own
         ("horovod", 4, 4, (YIELD,))]
# (engine, nodes, ranks per node, extra trainer flags) run once more with Horovod's timeline: what of
# the step is on the wire (TRAIN's Horovod-over-MPI runs on fewer than 16 ranks, those with Open
# MPI's ring at DenseNet-121's bytes only, and none at another cycle)
TIMELINE = [t for t in TRAIN if t[1] * t[2] < 16 and not any(x.startswith("HOROVOD_CYCLE_TIME=") for x in t[3])
            and (t[0] == "horovod" or t[0] == "horovod-ring" and "--model" not in t[3])]
# (engine, nodes, ranks per node, extra trainer flags) run REPEATS times more: how much an
# identical run's step and compute probe (and so the model's error) vary between runs
REPEATED = [("horovod-ring", 4, 1, ()), ("horovod-ring", 4, 1, ("--backward-passes-per-step", "2")),
            ("horovod", 4, 1, ()), ("tf", 4, 1, ())]
REPEATS = 2
WARMUP = 3  # trainer steps per epoch left out of the timing
LOCKS = ("/tmp/chexnet-rehearsal.lock", "/tmp/chexnet-heavy.lock")


def env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "PATH": f"{Path(PY).parent}:{os.environ['PATH']}",
                         "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                         "OMPI_MCA_mpi_yield_when_idle": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


@contextlib.contextmanager
def shaped(rate: str):
    """The rehearsal up and held, every node's link at `rate`; restored to unlimited after."""
    with locked(LOCKS):
        script = ["bash", str(ROOT / "tools" / "slurm_local.sh")]
        subprocess.run([*script, "up"], check=True, capture_output=True, timeout=600)
        try:
            for node in NODES:
                subprocess.run([*script, "link", node, "rate", rate], check=True)
            yield
        finally:
            for node in NODES:
                subprocess.run([*script, "link", node, "rate", "unlimited"], check=False)


@contextlib.contextmanager
def gloo_rendezvous(nodes: int, per_node: int):
    """Horovod's Gloo rendezvous server on this machine's bridge address for node1..node`nodes`,
    `per_node` ranks each (what horovodrun --gloo serves); yields the ranks' environment."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer()
    port = server.start()
    server.init(get_host_assignments(parse_hosts(",".join(f"{n}:{per_node}" for n in NODES[:nodes])),
                                     nodes * per_node))
    try:
        yield {"HOROVOD_GLOO_RENDEZVOUS_ADDR": BRIDGE_ADDRESS, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
               "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "eth0"}
    finally:
        server.stop()


def engine_flag(engine: str) -> str:
    """The suite's --engine for a measured engine ("gloo": Horovod over Gloo; "horovod-ring":
    over MPI, Open MPI told to run RING_RULES)."""
    return "tf" if engine == "tf" else "horovod"


def srun(engine: str, nodes: int, per_node: int, cmd: list[str], cwd: Path, timeout: float = 1200,
         extra_env: dict | None = None) -> str:
    """`cmd` (python and its arguments) once per rank on node1..node`nodes`, `per_node` ranks
    each, under Horovod over MPI ("horovod"; "horovod-ring": its allreduce as RING_RULES says),
    over Gloo ("gloo") or the tf engine; its stdout."""
    if engine == "horovod-ring":
        (cwd / "ring_rules.txt").write_text(RING_RULES)
        extra_env = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
                     "OMPI_MCA_coll_tuned_dynamic_rules_filename": str(cwd / "ring_rules.txt")} | (extra_env or {})
    launch = ["srun", f"--mpi={'pmix' if engine.startswith('horovod') else 'none'}", f"-N{nodes}",
              f"--ntasks-per-node={per_node}", "-w", ",".join(NODES[:nodes]), "--kill-on-bad-exit=1"]
    if engine == "gloo":  # each rank told its place as horovodrun --gloo would
        cmd = [cmd[0], str(ROOT / "bench" / "gloo_rank.py"), *cmd[1:]]
    with gloo_rendezvous(nodes, per_node) if engine == "gloo" else contextlib.nullcontext({}) as gloo:
        proc = subprocess.run([*launch, *cmd], cwd=cwd, env=env() | gloo | (extra_env or {}), capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(launch)} {cmd[:4]}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout


def sent_bytes(nodes: int) -> list[int]:
    """The bytes node1..node`nodes` have sent over their links (their eth0's counters)."""
    def sent(node: str) -> int:
        out = subprocess.run(["ip", "-n", node, "-s", "-j", "link", "show", "eth0"], check=True, capture_output=True,
                             text=True).stdout
        return json.loads(out)[0]["stats64"]["tx"]["bytes"]
    return [sent(node) for node in NODES[:nodes]]


def sweep(engine: str, nodes: int, per_node: int, tmp: Path, repeats: int, sizes: tuple = SIZES,
          extra_env: dict | None = None) -> list[dict]:
    """The allreduce times of every size on one layout, each with the bytes every node sent over
    its link per byte allreduced (the whole sweep's: a ring crossing each link once sends
    2 (N-1)/N)."""
    before = sent_bytes(nodes)
    out = srun(engine, nodes, per_node, [PY, str(ROOT / "bench" / "comm_worker.py"), "--engine", engine_flag(engine),
                                         "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats)], tmp,
               extra_env=extra_env)
    reduced = sum(sizes) * (repeats + 1)  # each size once to warm up, then timed
    sent = [round((b - a) / reduced, 2) for a, b in zip(before, sent_bytes(nodes), strict=True)]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r | {"engine": engine, "nodes": nodes, "per_node": per_node, "sent_per_byte": sent} for r in rows]


def rate_check(repeats: int) -> dict:
    """The same allreduce on 2 and 4 nodes at each of RATES: whether its growth with N is the
    ring's 2 (N-1)/N at every link rate. A cost of the 2 shared cores (fixed per byte, and
    contended by 4 ranks more than by 2) would weigh more as the links get faster."""
    rows, failed = [], []
    for rate in RATES:
        with shaped(rate), tempfile.TemporaryDirectory() as tmp:
            for engine, nodes in itertools.product(("horovod", "tf", "gloo"), (2, 4)):
                try:
                    rows += [r | {"rate": rate} for r in sweep(engine, nodes, 1, Path(tmp), repeats, (RATE_CHECK_BYTES,))]
                except (RuntimeError, subprocess.TimeoutExpired) as err:  # kept in the record, the rest goes on
                    failed.append({"rate": rate, "engine": engine, "nodes": nodes, "error": str(err)[-1500:]})
    return {"date": today(), "repeats": repeats, "rows": rows, "failed": failed}


def algorithm_check(rate: str, repeats: int) -> dict:
    """Horovod over MPI's allreduce of RATE_CHECK_BYTES on 2 and 4 nodes at `rate`, Open MPI's
    allreduce algorithm left to its own choice ("default") and forced to each of ALGORITHMS:
    which algorithm the default runs, and how its repeats spread (the ring model assumes a ring)."""
    rows, failed = [], []
    choices = {"default": {}} | {name: {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
                                        "OMPI_MCA_coll_tuned_allreduce_algorithm": str(number)}
                                 for name, number in ALGORITHMS.items()}
    with shaped(rate), tempfile.TemporaryDirectory() as tmp:
        for (name, forced), nodes in itertools.product(choices.items(), (2, 4)):
            try:
                rows += [r | {"algorithm": name} for r in sweep("horovod", nodes, 1, Path(tmp), repeats,
                                                                 (RATE_CHECK_BYTES,), forced)]
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # kept in the record, the rest goes on
                failed.append({"algorithm": name, "nodes": nodes, "error": str(err)[-1500:]})
    return {"date": today(), "rate": rate, "repeats": repeats, "rows": rows, "failed": failed}


def fitted(rows: list[dict], engine: str) -> projection.Network:
    """The ring model fitted to `engine`'s one-rank-per-node allreduces."""
    bandwidth, latency = projection.fit_ring([(r["bytes"], r["ranks"], r["seconds"]) for r in rows
                                           if r["engine"] == engine and r["per_node"] == 1])
    return projection.Network(bandwidth_gbs=bandwidth, latency_us=latency)


def on_layout(net: projection.Network, per_node: int, hierarchical: bool) -> projection.Network:
    """`net` with `per_node` ranks per node whose memory is free beside the links: one flat
    ring over all ranks paced by the links, or hierarchical (a ring across the nodes only)."""
    return projection.Network(net.bandwidth_gbs, net.latency_us, net.overlap, per_node, intra_bandwidth_gbs=1e9,
                           intra_latency_us=0.0, hierarchical=hierarchical)


def predict_sweep(rows: list[dict], nets: dict) -> list[dict]:
    """Each allreduce's prediction by both layouts' models and its error (+: the model is slower)."""
    for r in rows:
        for kind, hierarchical in (("flat", False), ("hierarchical", True)):
            net = on_layout(nets[r["engine"]], r["per_node"], hierarchical)
            predicted = projection.allreduce_seconds(r["bytes"], r["ranks"], net)
            r |= {f"predicted_{kind}": predicted, f"error_{kind}": (predicted - r["seconds"]) / r["seconds"]}
    return rows


def records(tmp: Path) -> Path:
    """Synthetic 32-px records the trainer reads its manifest and validation from."""
    subprocess.run([PY, "-m", "chexnet_hvd.synthetic", "--out", str(tmp / "syn"), "--images", "400", "--size", "32",
                    "--seed", "0"], cwd=ROOT, env=env(), check=True, capture_output=True)
    out = tmp / "records"
    subprocess.run([PY, "-m", "chexnet_hvd.records", "--csv", str(tmp / "syn" / "Data_Entry_2017.csv"), "--images",
                    str(tmp / "syn" / "images"), "--out", str(out), "--shard-size", "64", "--no-progress"],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    return out


def trace_events(timeline: Path) -> tuple[list[dict], bool]:
    """The events of a Chrome-trace file Horovod writes as it goes, and whether it was cut off
    (no closing bracket; a kill can cut it inside an event, whose part is left out)."""
    text, events, decoder = timeline.read_text(), [], json.JSONDecoder()
    at = text.index("[") + 1 if "[" in text else len(text)
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return events, at >= len(text)
        try:
            event, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return events, True
        events.append(event)


def allreduce_steps(timeline: Path) -> list[list[dict]]:
    """The allreduces Horovod ran (rank 0's timeline), per update: the k-th update holds each
    gradient's k-th allreduce, merged over the tensors one fused buffer carried into rounds,
    each {"start"/"end": the round's, "wire": [start, end] of the *_ALLREDUCE activity,
    "copies": the fusion-buffer copies in and out, as their spans}, seconds. Gradients are the
    tensors Horovod's optimizer names `..._grads_...` (in a trace without such names, those
    allreduced as often as most are: once per update; a stop check joins them where it runs as
    often, the epochs' metric averaging does not): grouped by tensor, not by the gaps between
    rounds, which within one update can be longer than between two. A trace cut off in its last
    update: that update, which some gradients lack, is left out."""
    events, cut = trace_events(timeline)
    stacks: dict = {}
    ops: dict = {}  # per tensor (the timeline's pid): its allreduces, in order
    for event in events:
        stack = stacks.setdefault(event.get("pid"), [])
        if event.get("ph") == "B":
            stack.append((event["name"], event["ts"] / 1e6))
            if event["name"] == "ALLREDUCE":
                ops.setdefault(event["pid"], []).append({"copies": []})
        elif event.get("ph") == "E" and stack:
            name, start = stack.pop()
            op, span = (ops.get(event["pid"]) or [None])[-1], (start, event["ts"] / 1e6)
            if op is None:
                continue
            if name == "ALLREDUCE":
                op |= {"start": start, "end": span[1]}
            elif name.startswith("MEMCPY_"):
                op["copies"].append(span)
            elif name.endswith("_ALLREDUCE") and name != "NEGOTIATE_ALLREDUCE":
                op["wire"] = span
    spans = {pid: [o for o in done if {"end", "wire"} <= o.keys()] for pid, done in ops.items()}
    spans = {pid: done for pid, done in spans.items() if done}
    if not spans:
        raise ValueError(f"{timeline}: no allreduce in Horovod's timeline")
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("name") == "process_name"}
    gradients = [s for pid, s in spans.items() if "_grads_" in names.get(pid, "")]
    if not gradients:  # (a count of a cut trace can take in another tensor: names first)
        most = collections.Counter(map(len, spans.values())).most_common(1)[0][0]
        gradients = [s for s in spans.values() if len(s) == most or cut and abs(len(s) - most) == 1]
    return [rounds([g[k] for g in gradients]) for k in range(min(map(len, gradients)))]


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Time spans joined where they overlap, in order (a fused buffer's tensors share theirs)."""
    out: list = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(m) for m in out]


def rounds(ops: list[dict]) -> list[dict]:
    """One update's allreduces joined where their time on the wire overlaps (one fused buffer's),
    in order: per round, the earliest start, the latest end, the wire's span and the copies'."""
    out: list = []
    for op in sorted(ops, key=lambda o: o["wire"]):
        if out and op["wire"][0] <= out[-1]["wire"][1]:
            last = out[-1]
            last.update(start=min(last["start"], op["start"]), end=max(last["end"], op["end"]),
                        wire=(last["wire"][0], max(last["wire"][1], op["wire"][1])),
                        copies=merged(last["copies"] + op["copies"]))
        else:
            out.append(op | {"copies": merged(op["copies"])})
    return out


def wire_per_step(updates: list[list[dict]], steps: int) -> dict:
    """Of the last `steps` updates' fused rounds (`allreduce_steps`), medians per update: seconds
    on the wire, rounds, the span from the first round's wire start to the last's end; the
    fusion-buffer copies; the rest of the rounds' time off the wire (`round_other`: until their
    last tensor was marked done); between one round's end and the next's start, no
    round running (`between`: the next gradients not yet handed to Horovod by every rank, or
    Horovod's cycle: Horovod runs a round at a time, so it cannot tell which)."""
    last = updates[-steps:]

    def median(per_update) -> float:
        return statistics.median(per_update(u) for u in last)

    def length(spans) -> float:
        return sum(e - s for s, e in spans)
    return {"wire_seconds": median(lambda u: length(r["wire"] for r in u)),
            "rounds": median(len), "span_seconds": median(lambda u: u[-1]["wire"][1] - u[0]["wire"][0]),
            "copy_seconds": median(lambda u: sum(length(r["copies"]) for r in u)),
            "round_other_seconds": median(lambda u: sum(r["end"] - r["start"] - length([r["wire"], *r["copies"]])
                                                        for r in u)),
            "between_seconds": median(lambda u: sum(n["start"] - p["end"] for p, n in itertools.pairwise(u))),
            "grouped_by": "tensor"}


def split_knobs(extra: tuple) -> tuple[dict, list]:
    """A run's extra items as (environment, trainer flags): NAME=value with NAME a variable's name
    that starts upper-case goes to the ranks' environment (Horovod's settings, Open MPI's
    OMPI_MCA_*), the rest to the trainer."""
    def knob(item: str) -> bool:
        return re.fullmatch(r"[A-Z][A-Za-z0-9_]*=.*", item) is not None
    return dict(x.partition("=")[::2] for x in extra if knob(x)), [x for x in extra if not knob(x)]


def train(engine: str, nodes: int, per_node: int, extra: tuple, data: Path, tmp: Path, args,
          timeline: bool = False, again: int = 0) -> dict:
    """One real trainer run; its last epoch's measured step and compute probe (with `timeline`,
    Horovod's timeline of it: what of the step is on the wire, `wire_per_step`, per allreduce:
    one per `--backward-passes-per-step` steps); `again`: the how-manieth repeat of it."""
    run_dir = tmp / f"run-{engine}-{nodes}x{per_node}-{'-'.join(extra) or 'plain'}{'-traced' if timeline else ''}{f'-again{again}' if again else ''}"
    k = int(extra[1]) if extra[:1] == ("--backward-passes-per-step",) else 1
    knobs, flags = split_knobs(extra)
    timed = args.steps - WARMUP + (WARMUP - args.steps) % k  # whole accumulation cycles: 1 allreduce per k steps
    cmd = [PY, "-m", "chexnet_hvd.train", "--data", str(data), "--run-dir", str(run_dir), "--model", "densenet121",
           "--image-size", "32", "--batch-size", str(args.batch), "--epochs", "2", "--steps-per-epoch",
           str(WARMUP + timed), "--timing-warmup-steps", str(WARMUP), "--synthetic-input", "--threads", "1",
           "--verbose", "0", "--engine", engine_flag(engine), *flags]
    trace = run_dir.with_name(run_dir.name + "-timeline.json")
    srun(engine, nodes, per_node, cmd, tmp, extra_env=knobs | ({"HOROVOD_TIMELINE": str(trace)} if timeline else {}))
    log = read_runlog(run_dir)
    start, last = log[0], [r for r in log if r["event"] == "epoch"][-1]
    grad_bytes = 4 * start["trainable_params"] / (2 if "--fp16-allreduce" in extra else 1)
    run = {"engine": engine, "nodes": nodes, "per_node": per_node, "ranks": nodes * per_node,
           "flags": " ".join(extra), "backward_passes": k, "gradient_bytes": grad_bytes,
           "measured_step": last["step_seconds"], "compute": max(last["compute_seconds"]), "machine": machine(),
           "compute_seconds": last["compute_seconds"]}
    return run | ({"timeline": wire_per_step(allreduce_steps(trace), timed // k)} if timeline else {})


def update_costs() -> dict:
    """Per model the trainer runs here, seconds of the optimizer's update alone (bench/update_worker.py)."""
    def seconds(model: str) -> float:
        out = subprocess.run([PY, str(ROOT / "bench" / "update_worker.py"), "--model", model], env=env(), check=True,
                             capture_output=True, text=True, timeout=900).stdout
        return json.loads(out.splitlines()[-1])["seconds"]
    return {model: seconds(model) for model in ("densenet121", "resnet50")}


def run_model(r: dict) -> str:
    """The model a trainer run trained (its --model, else DenseNet-121)."""
    flags = r["flags"].split()
    return flags[flags.index("--model") + 1] if "--model" in flags else "densenet121"


def alone_probes(runs: list[dict], cpus: int) -> dict:
    """Per model, the median compute probe of its runs with no more ranks than cores (one core
    each): the probe without contention, which a run's probe is measured against."""
    alone: dict = {}
    for r in runs:
        if r["ranks"] <= cpus:
            alone.setdefault(run_model(r), []).append(r["compute"])
    return {model: statistics.median(v) for model, v in alone.items()}


def predict_train(r: dict, nets: dict, updates: dict, alone: dict) -> dict:
    """A trainer run's step predicted by both layouts' models and its error. Its compute: the
    compute probe and the optimizer's update, timed alone on one thread and slowed as the run's
    probe is over the same model's with a core per rank (`alone`: alone_probes); once per
    backward passes per step."""
    model = run_model(r)
    contention = max(1.0, r["compute"] / alone[model]) if model in alone else 1.0
    update = updates.get(model, 0.0) * contention / r["backward_passes"]
    r = r | {"update": update}
    for kind, hierarchical in (("flat", False), ("hierarchical", True)):
        net = on_layout(nets[r["engine"]], r["per_node"], hierarchical)
        predicted = projection.step_seconds(r["compute"] + update, r["gradient_bytes"], r["ranks"], net,
                                            r["backward_passes"])
        r = r | {f"predicted_step_{kind}": predicted, f"error_{kind}": (predicted - r["measured_step"]) / r["measured_step"]}
    return r


def predict_runs(runs: list[dict], nets: dict, updates: dict, cpus: int, *others: list[dict]) -> list[list]:
    """Every trainer run (and the `others`: traced runs, repeats) predicted anew: by the fit and
    update costs of now, its probe's contention measured against all the trainer runs' (kept runs
    and new alike)."""
    alone = alone_probes(runs, cpus)
    return [[predict_train(r, nets, updates, alone) for r in rs] for rs in (runs, *others)]


def refit(path: Path) -> None:
    """Fit and predictions recomputed from the measurements of a saved result (no cluster; the
    optimizer's update timed first where the result lacks it)."""
    result = json.loads(path.read_text())
    nets = {engine: fitted(result["allreduce"], engine) for engine in sorted({r["engine"] for r in result["allreduce"]})}
    result["fit"] = {e: {"bandwidth_gbs": n.bandwidth_gbs, "latency_us": n.latency_us} for e, n in nets.items()}
    result["allreduce"] = predict_sweep(result["allreduce"], nets)
    result["update"] = result.get("update") or update_costs()
    result["train"], result["timeline"], result["repeats"] = predict_runs(
        result["train"], nets, result["update"], result["cpus"], result.get("timeline", []), result.get("repeats", []))
    path.write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="200mbit", help="every node's link, both ways (tc tbf)")
    ap.add_argument("--repeats", type=int, default=3, help="timed allreduces per size (median)")
    ap.add_argument("--batch", type=int, default=4, help="trainer: images per rank per step")
    ap.add_argument("--steps", type=int, default=7,
                    help=f"trainer: steps per epoch ({WARMUP} warm-up steps left out; the timed ones rounded up to "
                         "whole accumulation cycles)")
    ap.add_argument("--skip-train", action="store_true", help="only the allreduce sweep (no trainer runs, no rate or algorithm check)")
    ap.add_argument("--train-only", action="store_true",
                    help="only the trainer runs, against the allreduce sweep and fit already in --out")
    ap.add_argument("--timeline-only", action="store_true",
                    help="only the runs traced with Horovod's timeline, beside the sweep and trainer runs in --out")
    ap.add_argument("--missing-only", action="store_true",
                    help="only the sweep layouts, trainer and traced runs that --out lacks (a run cut short, "
                         "configurations added since), beside the sweep and runs it has")
    ap.add_argument("--rates-only", action="store_true",
                    help=f"only the rate check ({RATE_CHECK_BYTES / 1e6:g} MB on 2 and 4 nodes at {', '.join(RATES)}), "
                         "beside everything else in --out")
    ap.add_argument("--algorithms-only", action="store_true",
                    help=f"only the algorithm check (Horovod over MPI, {RATE_CHECK_BYTES / 1e6:g} MB on 2 and 4 nodes "
                         f"at --rate, Open MPI's allreduce algorithm its own choice and each of "
                         f"{', '.join(ALGORITHMS)}), beside everything else in --out")
    ap.add_argument("--out", default=str(DOCS / "bench_comm.json"))
    ap.add_argument("--refit", action="store_true", help="only recompute the fit and predictions in --out")
    args = ap.parse_args()
    if args.refit:
        refit(Path(args.out))
        return
    if args.rates_only or args.algorithms_only:
        check = {"rates": rate_check(args.repeats)} if args.rates_only else {}
        check |= {"algorithms": algorithm_check(args.rate, 2 * args.repeats)} if args.algorithms_only else {}
        kept = json.loads(Path(args.out).read_text())  # read after: what another pass wrote meanwhile stays
        Path(args.out).write_text(json.dumps(kept | check, indent=1))
        return
    began = time.time()
    rows, runs, traced, repeats, nets, failed, rates, algorithms, updates = [], [], [], [], {}, [], {}, {}, {}
    sweep_date = today()
    have: set = set()  # (engine, nodes, per_node, flags, traced) of the runs kept
    minutes_before = 0.0  # "minutes" sums every pass that wrote --out
    host = machine()  # a later pass on another machine is named beside the first's
    if args.train_only or args.timeline_only or args.missing_only:  # the sweep's measurements (and failures) kept
        kept = json.loads(Path(args.out).read_text())
        rows, failed = kept["allreduce"], [f for f in kept["failed"] if "flags" not in f]
        sweep_date, minutes_before = kept.get("sweep_date", kept["date"]), kept.get("minutes", 0.0)
        host = kept["machine"] if host in kept["machine"] else f"{kept['machine']}; what was added {today()}: {host}"
        rates, algorithms, updates = kept.get("rates", {}), kept.get("algorithms", {}), kept.get("update", {})
        if args.timeline_only or args.missing_only:  # and the trainer runs'
            runs, failed = kept["train"], [f for f in kept["failed"] if f.get("flags") != "(timeline)"]
            repeats = kept.get("repeats", [])
        if args.missing_only:  # and the traced ones'
            traced = kept.get("timeline", [])
            have = ({(r["engine"], r["nodes"], r["per_node"], r["flags"], False) for r in runs}
                    | {(r["engine"], r["nodes"], r["per_node"], r["flags"], True) for r in traced})
            failed = [f for f in kept["failed"] if "flags" not in f]

    def save() -> None:  # after every measurement: a long run cut short keeps what it measured
        predicted, traced_predicted, repeats_predicted = (
            predict_runs(runs, nets, updates, os.cpu_count(), traced, repeats) if nets else (runs, traced, repeats))
        result = {
            "machine": host, "date": today(), "sweep_date": sweep_date, "rate": args.rate,
            "link_gbs": rate_gbs(args.rate), "cpus": os.cpu_count(),
            "minutes": round(minutes_before + (time.time() - began) / 60, 1),
            "fit": {e: {"bandwidth_gbs": n.bandwidth_gbs, "latency_us": n.latency_us} for e, n in nets.items()},
            "allreduce": rows, "train": predicted, "timeline": traced_predicted, "repeats": repeats_predicted,
            "failed": failed, "rates": rates,
            "algorithms": algorithms, "update": updates}
        Path(args.out).write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp, shaped(args.rate):
        began = time.time()  # measured from here: waiting for the locks is not the benchmark's
        tmp = Path(tmp)
        measured = {(r["engine"], r["nodes"], r["per_node"]) for r in rows}
        for engine, nodes, per_node in ([] if args.train_only or args.timeline_only else
                                        [s for s in SWEEP if s not in measured] if args.missing_only else SWEEP):
            try:
                rows += sweep(engine, nodes, per_node, tmp, args.repeats)
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # kept in the record, the rest goes on
                failed.append({"engine": engine, "nodes": nodes, "per_node": per_node, "error": str(err)[-1500:]})
            print(f"sweep {engine} {nodes}x{per_node}: done ({time.time() - began:.0f} s)", flush=True)
            if args.missing_only:  # measured today, beside the kept sweep's date
                sweep_date = f"{sweep_date.split('; ')[0]}; added layouts: {today()}"
            save()
        nets = {engine: fitted(rows, engine) for engine in sorted({r["engine"] for r in rows})}
        rows = predict_sweep(rows, nets)
        save()
        if not args.skip_train:
            data = records(tmp)
            updates = updates or update_costs()  # what the compute probe leaves out
            for engine, nodes, per_node, extra in [] if args.timeline_only else TRAIN:
                if (engine, nodes, per_node, " ".join(extra), False) in have:
                    continue
                try:
                    runs.append(train(engine, nodes, per_node, extra, data, tmp, args))
                except (RuntimeError, subprocess.TimeoutExpired, KeyError, IndexError) as err:
                    failed.append({"engine": engine, "nodes": nodes, "per_node": per_node, "flags": " ".join(extra),
                                   "error": f"{type(err).__name__}: {str(err)[-1500:]}"})
                    continue
                print(f"train {runs[-1]} ({time.time() - began:.0f} s)", flush=True)
                save()
            for engine, nodes, per_node, extra in TIMELINE:
                if (engine, nodes, per_node, " ".join(extra), True) in have:
                    continue
                try:
                    traced.append(train(engine, nodes, per_node, extra, data, tmp, args, timeline=True))
                except (RuntimeError, subprocess.TimeoutExpired, KeyError, IndexError, ValueError) as err:
                    failed.append({"engine": engine, "nodes": nodes, "per_node": per_node, "flags": "(timeline)",
                                   "error": f"{type(err).__name__}: {str(err)[-1500:]}"})
                    continue
                print(f"timeline {traced[-1]} ({time.time() - began:.0f} s)", flush=True)
                save()
            for engine, nodes, per_node, extra in [] if args.timeline_only else REPEATED:
                done = sum((r["engine"], r["nodes"], r["per_node"], r["flags"]) == (engine, nodes, per_node, " ".join(extra))
                           for r in repeats)
                for again in range(done + 1, REPEATS + 1):
                    try:
                        repeats.append(train(engine, nodes, per_node, extra, data, tmp, args, again=again))
                    except (RuntimeError, subprocess.TimeoutExpired, KeyError, IndexError) as err:
                        failed.append({"engine": engine, "nodes": nodes, "per_node": per_node, "flags": "(repeat)",
                                       "error": f"{type(err).__name__}: {str(err)[-1500:]}"})
                        continue
                    print(f"repeat {repeats[-1]} ({time.time() - began:.0f} s)", flush=True)
                    save()
            save()  # the last run's failure too
    if not (args.train_only or args.timeline_only or args.missing_only or args.skip_train):
        rates = rate_check(args.repeats)
        algorithms = algorithm_check(args.rate, 2 * args.repeats)
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
