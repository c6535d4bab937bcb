"""tools/scaling_report.py on fixture run logs written with the real run-log writer."""

import csv
import dataclasses
import json

import pytest
from conftest import ROOT, assert_one_line_error, fill, module, run, small_disk

from chexnet_hvd import projection, runlog, scaling

REPORT = str(ROOT / "tools" / "scaling_report.py")


def write_run(run_dir, ranks, ips, model="densenet121", epoch_seconds=(50.0, 10.0, 12.0), first=1,
              local_batch=16, verdicts=(), **start):
    """A run log of `ranks` at `ips` img/s; `verdicts`: each epoch's bottleneck fields, in order."""
    writer = runlog.RunLogWriter(run_dir)
    writer.write("start", model=model, image_size=224, precision="fp32", local_batch=local_batch,
                 global_batch=local_batch * ranks, world_size=ranks, **start)
    for epoch, seconds in enumerate(epoch_seconds, first):
        # epoch 1 is warm-up: a value that would spoil every number if it were counted
        rate = 1.0 if epoch == 1 else ips
        writer.write("epoch", epoch=epoch, seconds=seconds, images_per_sec=rate,
                     images_per_sec_per_rank=rate / ranks, **(verdicts[epoch - first] if verdicts else {}))
    writer.write("end", status="completed")
    writer.close()


@pytest.fixture
def runs(tmp_path):
    for ranks, ips in ((1, 100.0), (2, 180.0), (4, 320.0)):
        write_run(tmp_path / f"dn_np{ranks}", ranks, ips)
    write_run(tmp_path / "cnn_np1", 1, 1000.0, model="small_cnn")
    write_run(tmp_path / "cnn_np2", 2, 1500.0, model="small_cnn")
    return tmp_path


def test_speedup_and_efficiency(runs):
    rows = scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(runs)])))
    dn = {r["ranks"]: r for r in rows if r["model"] == "densenet121"}
    assert [dn[n]["speedup"] for n in (1, 2, 4)] == pytest.approx([1.0, 1.8, 3.2])
    assert [dn[n]["efficiency"] for n in (1, 2, 4)] == pytest.approx([1.0, 0.9, 0.8])
    assert dn[4]["images_per_sec_per_rank"] == pytest.approx(80.0)
    assert dn[2]["epoch_seconds_mean"] == pytest.approx(11.0) and dn[2]["epochs"] == 2
    cnn = {r["ranks"]: r for r in rows if r["model"] == "small_cnn"}
    assert cnn[2]["efficiency"] == pytest.approx(0.75)  # groups do not mix


def test_a_resumed_run_credits_each_epoch_to_its_own_start(tmp_path):
    """3 epochs at 1 rank (100 img/s), then resumed on 4 ranks for 2 more (320 img/s): two rows,
    not one 4-rank row pooling all 5 epochs."""
    write_run(tmp_path, 1, 100.0, epoch_seconds=(50.0, 10.0, 10.0))
    write_run(tmp_path, 4, 320.0, epoch_seconds=(40.0, 3.0), first=4)  # appends to the same log
    rows = {r["ranks"]: r for r in scaling.scaling_rows(scaling.load_all([tmp_path / "runlog.jsonl"]))}
    assert sorted(rows) == [1, 4]
    assert (rows[1]["images_per_sec"], rows[1]["epochs"]) == (100.0, 2)
    assert (rows[4]["images_per_sec"], rows[4]["epochs"]) == (320.0, 1)
    assert rows[4]["efficiency"] == pytest.approx(0.8)


def test_a_lone_rank_joins_its_multi_rank_runs_whatever_its_transport(tmp_path):
    """A lone Horovod process reports mpi, horovodrun --gloo's ranks gloo: one rank moves no
    gradients, so it is the 1-rank row of the gloo runs (speedup over it); two transports
    among the multi-rank runs keep it apart."""
    write_run(tmp_path / "np1", 1, 100.0, backend="mpi")
    write_run(tmp_path / "np2", 2, 150.0, backend="gloo")
    rows = scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(tmp_path)])))
    assert [(r["ranks"], r["backend"], round(r["speedup"], 2)) for r in rows] == [(1, "gloo", 1.0), (2, "gloo", 1.5)]
    write_run(tmp_path / "np2mpi", 2, 170.0, backend="mpi")
    write_run(tmp_path / "np2nccl", 2, 190.0, backend="nccl")
    rows = scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(tmp_path)])))
    assert {(r["ranks"], r["backend"]) for r in rows} == {(1, "mpi"), (2, "gloo"), (2, "mpi"), (2, "nccl")}


@pytest.mark.parametrize("setting", [{"synthetic_input": True}, {"config": {"xla": True}},
                                     {"config": {"fp16_allreduce": True}}, {"backend": "mpi"},
                                     {"horovod_backend": "mpi"}, {"engine": "tf", "backend": "ring"},
                                     {"preprocess": "model graph"},
                                     {"config": {"backward_passes_per_step": 2}},
                                     {"config": {"steps_per_execution": 8}}], ids=str)
def test_runs_differing_in_a_throughput_setting_never_pool(tmp_path, setting):
    write_run(tmp_path / "a", 2, 180.0, horovod_backend="gloo")
    write_run(tmp_path / "b", 2, 400.0, **({"horovod_backend": "gloo"} | setting))
    rows = scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(tmp_path)])))
    assert sorted(r["images_per_sec"] for r in rows) == [180.0, 400.0]
    assert len({(scaling.title(r), scaling.transport(r)) for r in rows}) == 2


def test_the_engines_of_one_job_share_a_table_row_by_row(tmp_path):
    """Horovod and tf runs of the same job: one table, a row per world size and engine, each
    engine's own speedup, and the tf rows' img/s over Horovod's at the same world size."""
    for engine, backend, rates in (("horovod", "gloo", (100.0, 150.0)), ("tf", "ring", (110.0, 240.0))):
        for ranks, ips in zip((1, 2), rates, strict=True):
            write_run(tmp_path / f"{engine}{ranks}", ranks, ips, engine=engine, backend=backend)
    write_run(tmp_path / "other", 2, 500.0, model="small_cnn")
    text = scaling.markdown(scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(tmp_path)]))))
    tables = text.split("### ")[1:]
    assert len(tables) == 2
    dense = next(t for t in tables if t.startswith("densenet121"))
    assert "img/s / horovod/gloo's" in dense
    lines = [line for line in dense.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [line.split(" | ")[:3] for line in lines] == [
        ["| 1", "horovod/gloo", "100.0"], ["| 1", "tf/ring", "110.0"],
        ["| 2", "horovod/gloo", "150.0"], ["| 2", "tf/ring", "240.0"]]
    assert lines[3].split(" | ")[4] == "2.18"  # tf's own speedup: 240 / 110 * 1
    assert lines[3].split(" | ")[7].rstrip(" |") == "1.60"  # 240 / 150
    assert "/ horovod" not in next(t for t in tables if t.startswith("small_cnn"))  # one engine: no ratio


def test_no_speedup_or_efficiency_without_a_one_rank_run(runs, tmp_path):
    """Horovod ran on 2 and 4 ranks only, tf on 1 and 2: Horovod's smallest run is no base
    (as one it was called speedup 2.00, efficiency 100%, and the worse-scaling engine drew the
    best line). Its cells are "-", a note names it, the CSV leaves them empty."""
    logs = tmp_path / "logs"
    write_run(logs / "np2", 2, 180.0)
    write_run(logs / "np4", 4, 320.0)
    write_run(logs / "tf1", 1, 100.0, engine="tf", backend="ring")
    write_run(logs / "tf2", 2, 150.0, engine="tf", backend="ring")
    rows = scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(logs)])))
    assert [(r["engine"], r["ranks"], r["speedup"], r["efficiency"]) for r in rows if r["engine"] == "horovod"] == [
        ("horovod", 2, None, None), ("horovod", 4, None, None)]
    assert [(r["ranks"], r["speedup"], r["efficiency"]) for r in rows if r["engine"] == "tf"] == [
        (1, 1.0, 1.0), (2, 1.5, 0.75)]
    out_csv, out_png = tmp_path / "t.csv", tmp_path / "t.png"
    text = run([REPORT, str(logs), "--csv", str(out_csv), "--plot", str(out_png)], check=True).stdout
    assert "| 2 | horovod | 180.0 | 90.0 | - | - |" in text and "| 4 | horovod | 320.0 | 80.0 | - | - |" in text
    assert "| 2 | tf/ring | 150.0 | 75.0 | 1.50 | 75% |" in text
    assert "against a 1-rank run" in text and "none for horovod," in text
    assert [(r["ranks"], r["speedup"], r["efficiency"]) for r in csv.DictReader(out_csv.open())
            if r["engine"] == "horovod"] == [("2", "", ""), ("4", "", "")]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = scaling.markdown(scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(runs)]))))
    assert "-" not in full.replace("---", "") and "against" not in full  # every group has its 1-rank run


def test_a_rows_bottleneck_is_its_epochs_most_frequent_verdict_with_the_numbers_behind_it(tmp_path):
    """Epochs 2 and 4 network-bound, 3 compute-bound (epoch 1, warm-up, input-bound and left
    out): the row says network-bound, with the medians of those two epochs' numbers; a run
    whose epochs carry no verdict (an older trainer) says "-"."""
    def judged(found, step, compute, comm, empty):
        return {"bottleneck": found, "step_seconds": step, "compute_seconds": [compute / 2, compute],
                "communication_seconds": comm, "input_starved": [empty, 0.0]}

    write_run(tmp_path / "np2", 2, 180.0, epoch_seconds=(50.0, 10.0, 12.0, 11.0), verdicts=[
        judged("input-bound", 1.0, 0.1, 0.0, 0.9), judged("network-bound", 0.2, 0.05, 0.15, 0.1),
        judged("compute-bound", 0.1, 0.09, 0.01, 0.0), judged("network-bound", 0.3, 0.07, 0.23, 0.3)])
    write_run(tmp_path / "np1", 1, 100.0)
    rows = {r["ranks"]: r for r in scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(tmp_path)])))}
    two = rows[2]
    assert two["bottleneck"] == "network-bound"
    assert (two["step_ms"], two["compute_ms"], two["communication_ms"], two["input_empty"]) == pytest.approx(
        (250.0, 60.0, 190.0, 0.2))
    assert "bottleneck" not in rows[1]
    text = scaling.markdown(list(rows.values()))
    assert "| network-bound | 250.0 / 60.0 / 190.0, 20% |" in text
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("| 1 ")][0]].endswith(
        "| - | - |")
    out_csv = tmp_path / "t.csv"
    run([REPORT, str(tmp_path), "--csv", str(out_csv)], check=True)
    cells = {int(r["ranks"]): r for r in csv.DictReader(out_csv.open())}
    assert (cells[2]["bottleneck"], float(cells[2]["communication_ms"])) == ("network-bound", 190.0)
    assert cells[1]["bottleneck"] == ""


def test_one_global_batch_over_several_world_sizes_is_strong_scaling(tmp_path):
    """Global batch 64 as 1 x 64, 2 x 32 and 4 x 16: strong speedup over the 1-rank run and
    efficiency per rank; each has no weak-scaling base of its own but the 1-rank run. Every row
    gives the time an epoch of NIH's training split would take at its rate."""
    for ranks, ips in ((1, 100.0), (2, 180.0), (4, 300.0)):
        write_run(tmp_path / f"np{ranks}", ranks, ips, local_batch=64 // ranks)
    rows = {r["ranks"]: r for r in scaling.scaling_rows(scaling.load_all(scaling.find_runlogs([str(tmp_path)])))}
    assert [rows[n]["strong_speedup"] for n in (1, 2, 4)] == pytest.approx([1.0, 1.8, 3.0])
    assert [rows[n]["strong_efficiency"] for n in (1, 2, 4)] == pytest.approx([1.0, 0.9, 0.75])
    assert [rows[n]["speedup"] for n in (1, 2, 4)] == [1.0, None, None]
    assert rows[2]["nih_epoch_seconds"] == pytest.approx(scaling.NIH_TRAIN_IMAGES / 180.0)
    text = run([REPORT, str(tmp_path)], check=True).stdout
    strong = text[text.index("### Strong scaling: densenet121, 224 px, fp32, global batch 64, records input"):]
    assert "| 2 | horovod | 32 | 180.0 | 1.80 | 90% | 7.2 min |" in strong
    assert "| 4 | horovod | 16 | 300.0 | 3.00 | 75% | 4.3 min |" in strong
    alone = tmp_path / "alone"
    write_run(alone, 2, 180.0)
    assert "Strong scaling" not in run([REPORT, str(alone)], check=True).stdout  # one world size: no series


@pytest.mark.slow
def test_cli_writes_markdown_csv_png_with_baseline(runs, tmp_path):
    baseline = tmp_path / "dell.csv"
    baseline.write_text("ranks,images_per_sec\n1,185.12\n2,315.26\n4,589.36\n")
    out_csv, out_png = tmp_path / "t.csv", tmp_path / "t.png"
    proc = run([REPORT, str(runs / "dn_*"), "--csv", str(out_csv), "--plot", str(out_png),
                "--baseline", str(baseline)], check=True)
    assert "| 2 | horovod | 180.0 | 90.0 | 1.80 | 90% |" in proc.stdout
    assert "185.1" in proc.stdout and "0.57" in proc.stdout  # 180 / 315.26
    rows = list(csv.DictReader(out_csv.open()))
    assert [int(r["ranks"]) for r in rows] == [1, 2, 4]
    assert float(rows[2]["ratio_to_baseline"]) == pytest.approx(320 / 589.36)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_schema_and_empty_dirs_give_one_line_errors(tmp_path):
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "runlog.jsonl").write_text(json.dumps({"schema": "someone-else/3", "event": "start"}) + "\n")
    assert_one_line_error(run([REPORT, str(bad)]), "runlog.jsonl:1", "someone-else/3")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run([REPORT, str(tmp_path / "empty")]), "no runlog.jsonl found")


def test_torn_lines_are_skipped_and_counted(tmp_path):
    """A write cut short by a kill or a full disk, at the end or (once the next attempt has
    appended) in the middle: readers skip it and say which line it was."""
    write_run(tmp_path, 1, 50.0)
    with open(tmp_path / "runlog.jsonl", "a") as fh:
        fh.write('{"schema": "chexnet_hvd.runlog/1", "event": "ep')
    assert runlog.read_runlog(tmp_path)[-1]["event"] == "end"
    lines = len((tmp_path / "runlog.jsonl").read_text().splitlines())
    writer = runlog.RunLogWriter(tmp_path)  # the next attempt: ends the torn line, then appends
    writer.write("end", status="completed")
    records, skipped = runlog.read_records(tmp_path)
    assert skipped == [lines] and records[-1]["status"] == "completed"
    proc = run([REPORT, str(tmp_path)])
    assert proc.returncode == 0 and "| 1 |" in proc.stdout
    assert f"runlog.jsonl: skipped unreadable line(s) {lines}" in proc.stderr


def test_what_the_templates_ask_the_run_log_about_an_attempt(tmp_path):
    """The Slurm templates' questions (job_submissions/slurm/common.sh): the records before an
    attempt (0 with no run log yet, or only a torn line), how that attempt ended (`none`: it
    failed before its start record, so the stall before it is not its own), and how many
    attempts stalled since an epoch last completed (2 ends the job)."""
    def ask(*flags):
        return module("runlog", tmp_path, *flags, check=True).stdout.strip()

    def attempt(*ends, epochs=0):
        writer.write("start", world_size=2, local_batch=8, model="small_cnn", image_size=8, precision="fp32")
        for epoch in range(epochs):
            writer.write("epoch", epoch=epoch + 1, seconds=1.0, images_per_sec=10.0)
        for end in ends:
            writer.write("end", status=end)

    assert ask("--records") == "0"
    (tmp_path / "runlog.jsonl").write_text('{"schema": "chexnet_hvd.runlog/1", "ev')  # killed mid-write
    assert ask("--records") == "0"
    writer = runlog.RunLogWriter(tmp_path)
    attempt("stalled", epochs=2)
    before = ask("--records")
    assert (before, ask("--after", before), ask("--stalled-in-a-row")) == ("4", "none", "1")
    assert (ask("--after", 0), ask()) == ("stalled", "stalled")
    attempt()  # killed before its end
    assert ask("--after", before) == "running"
    attempt("stalled")  # no epoch since the first stall
    assert (ask("--stalled-in-a-row"), ask("--count", "stalled")) == ("2", "2")
    attempt("stalled", epochs=1)  # an epoch, then a stall: another fault
    assert (ask("--stalled-in-a-row"), ask("--count", "stalled")) == ("1", "3")
    writer.write("epoch", epoch=2, seconds=0.0, images_per_sec=None, steps=0)  # a resume left it empty
    writer.write("end", status="stalled")
    assert ask("--stalled-in-a-row") == "2"
    attempt()
    writer.write("end", status="stalled", ranks=[], suspended=75)  # the engine gave up during a suspension
    assert (ask(), ask("--stalled-in-a-row")) == ("stalled", "2")  # the scheduler's doing: not counted
    writer.write("start", world_size=2, local_batch=8, model="small_cnn", image_size=8, precision="fp32",
                 slurm_job_id="7")  # the user resubmits on the run, the bad node excluded
    writer.write("end", status="stalled")
    assert ask("--stalled-in-a-row") == "1"  # that job's first stall: requeued
    writer.write("end", status="stalled", before_start=True, slurm_job_id="7")  # its requeued attempt's start-up
    assert ask("--stalled-in-a-row") == "2"
    assert_one_line_error(module("runlog", tmp_path, "--records", "--stalled-in-a-row"),
                          "--stalled-in-a-row", "give one of")
    assert_one_line_error(module("runlog", tmp_path, "--count", "failed", "--after", "3"), "--after", "give one of")


def test_a_run_log_write_on_a_full_disk_names_the_run_log(tmp_path):
    """The flush fails, not the open: its error names no file unless the writer adds it."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        writer = runlog.RunLogWriter(disk)
        fill(disk)
        with pytest.raises(OSError) as failed:
            writer.write("end", status="completed", note="x" * 8192)
        assert (failed.value.filename, failed.value.strerror) == (str(disk / "runlog.jsonl"), "No space left on device")


def test_projection_matches_hand_computed_ring_allreduce():
    # 4 MB of gradients (1e6 fp32 parameters), 1 GB/s, 100 us per ring step, half hidden:
    # N=2: 2*(1/2)*4e6/1e9 + 2*100e-6 = 0.0042 s -> step 0.1 + 0.0021 = 0.1021 s
    # N=4: 2*(3/4)*4e6/1e9 + 6*100e-6 = 0.0066 s -> step 0.1 + 0.0033 = 0.1033 s
    net = projection.Network(bandwidth_gbs=1.0, latency_us=100.0, overlap=0.5)
    rows = {r["ranks"]: r for r in projection.project(0.1, 4e6, 16, [1, 2, 4], net)}
    assert rows[1]["efficiency"] == 1.0 and rows[1]["images_per_sec"] == pytest.approx(160.0)
    assert rows[2]["allreduce_seconds"] == pytest.approx(0.0042)
    assert rows[2]["images_per_sec"] == pytest.approx(32 / 0.1021)
    assert rows[4]["efficiency"] == pytest.approx(0.1 / 0.1033)
    assert rows[4]["speedup"] == pytest.approx(4 * 0.1 / 0.1033)


def test_hierarchical_allreduce_matches_hand_computed_terms():
    # 8 ranks, 4 per node, 1e8 bytes; inter 1 GB/s + 10 us, intra 100 GB/s + 1 us.
    # intra ring of 4: 2*3/4*1e8/1e11 + 6*1e-6 = 0.0015 + 0.000006
    # inter ring of 2 nodes: 2*1/2*1e8/1e9 + 2*10e-6 = 0.1 + 0.00002
    net = projection.Network(bandwidth_gbs=1.0, latency_us=10.0, gpus_per_node=4, intra_bandwidth_gbs=100.0,
                          intra_latency_us=1.0)
    assert projection.nodes_of(8, net) == (2, 4) and projection.nodes_of(2, net) == (1, 2)
    assert projection.allreduce_seconds(1e8, 8, net) == pytest.approx(0.001506 + 0.10002)
    assert projection.allreduce_seconds(1e8, 4, net) == pytest.approx(0.001506)  # one node: NVLink only
    # flat ring over all 8 (Open MPI, Gloo, the tf engine): 14 steps of 1e8/8 at the slower link
    flat = dataclasses.replace(net, hierarchical=False)
    assert projection.allreduce_seconds(1e8, 8, flat) == pytest.approx(14 / 8 * 0.1 + 14 * 10e-6)
    # one GPU per node: the plain ring of the original model
    assert projection.allreduce_seconds(1e8, 8, projection.Network(1.0, 10.0)) == pytest.approx(
        projection.ring_seconds(1e8, 8, 1.0, 10.0))


def test_step_time_knobs_halve_and_divide_the_allreduce():
    net = projection.Network(bandwidth_gbs=1.0, latency_us=0.0)
    comm = projection.allreduce_seconds(4e7, 4, net)  # 2*3/4*0.04 = 0.06 s
    assert comm == pytest.approx(0.06)
    assert projection.step_seconds(0.1, 4e7, 4, net) == pytest.approx(0.16)
    assert projection.step_seconds(0.1, 2e7, 4, net) == pytest.approx(0.13)  # fp16: half the bytes
    assert projection.step_seconds(0.1, 4e7, 4, net, backward_passes=3) == pytest.approx(0.12)
    hidden = dataclasses.replace(net, overlap=0.5)
    assert projection.step_seconds(0.1, 4e7, 4, hidden) == pytest.approx(0.13)


def test_strong_scaling_splits_the_global_batch_and_epoch_time_follows_the_rate():
    # compute 0.1 s per 16 images; global batch 64 over 4 ranks: 0.1 s compute + 0.06 s allreduce,
    # against 0.4 s on one rank: speedup 2.5, efficiency 62.5%
    net = projection.Network(bandwidth_gbs=1.0, latency_us=0.0)
    rows = {r["ranks"]: r for r in projection.project(0.1, 4e7, 16, [1, 4], net, global_batch=64, epoch_images=1600)}
    assert rows[4]["strong_step_seconds"] == pytest.approx(0.16)
    assert rows[4]["strong_speedup"] == pytest.approx(2.5) and rows[4]["strong_efficiency"] == pytest.approx(0.625)
    assert rows[1]["strong_speedup"] == pytest.approx(1.0)
    assert rows[1]["epoch_seconds"] == pytest.approx(10.0)  # 1600 images at 160 img/s
    assert rows[4]["epoch_seconds"] == pytest.approx(1600 / (64 / 0.16))
    assert "strong: efficiency" in projection.projection_markdown(list(rows.values()))


def test_fit_ring_recovers_the_bandwidth_and_latency_it_was_given():
    # samples made by the model itself at 0.025 GB/s (200 Mbit/s) and 300 us: the fit finds them
    samples = [(size, n, projection.ring_seconds(size, n, 0.025, 300.0))
               for size in (1e3, 1e5, 1e6, 2.8e7) for n in (2, 3, 4)]
    bandwidth, latency = projection.fit_ring(samples)
    assert bandwidth == pytest.approx(0.025) and latency == pytest.approx(300.0)
    with pytest.raises(ValueError):
        projection.fit_ring([(1e6, 1, 0.1), (1e6, 2, 0.1)])  # one usable sample


def test_readme_projection_table_is_the_models():
    """The README's projection table, row by row, is what projection.project gives for the
    assumptions it states (4 GPUs per node, NVLink defaults, 25 GbE / EDR InfiniBand)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| model (1-GPU step) | between nodes |"):].split("\n\n")[0].splitlines()[2:]
    models = [(0.265, 6968206, 64), (0.063, 83379278, 16)]
    fabrics = [(3.125, 25.0), (12.5, 10.0)]
    expected = []
    for step, params, batch in models:
        for bandwidth, latency in fabrics:
            for size in (4, 2):
                net = projection.Network(bandwidth, latency, gpus_per_node=4)
                rows = projection.project(step, params * size, batch, [16, 64, 256], net)
                expected.append([f"{r['efficiency'] * 100:.0f}%" for r in rows]
                                + [scaling.duration(rows[0]["epoch_seconds"])])
    assert [[c.strip() for c in line.strip("|").split("|")][3:] for line in table] == expected


def test_projection_cli_from_a_one_rank_run_log(tmp_path):
    writer = runlog.RunLogWriter(tmp_path / "np1")
    writer.write("start", model="densenet121", image_size=224, precision="fp32", local_batch=16,
                 global_batch=16, world_size=1, trainable_params=1_000_000)
    for epoch in (1, 2, 3):
        writer.write("epoch", epoch=epoch, seconds=10.0, images_per_sec=160.0, images_per_sec_per_rank=160.0)
    writer.close()
    proc = run([REPORT, "--project", str(tmp_path / "np1"), "--ranks", "1", "2", "4", "--bandwidth-gbs", "1",
                "--latency-us", "100", "--overlap", "0.5"], check=True)
    assert "| 4 | 4 | 0.1033 | 0.0066 | 619.6 | 3.87 | 96.8% |" in proc.stdout, proc.stdout
    fp16 = run([REPORT, "--project", "--step-time", "0.1", "--params", "1e6", "--batch", "16", "--ranks", "2",
                "--bandwidth-gbs", "1", "--latency-us", "100", "--overlap", "0", "--fp16-allreduce"], check=True)
    assert "| 2 | 2 | 0.1022 | 0.0022 |" in fp16.stdout, fp16.stdout  # 2 MB: 0.002 + 0.0002
    bad = run([REPORT, "--project", str(tmp_path / "nothing")])
    assert_one_line_error(bad)


def test_a_diverged_loss_is_null_in_the_run_log_not_nan(tmp_path):
    """json.dumps writes NaN and Infinity, which strict JSON readers (jq, most languages) refuse:
    the writer makes them null, nested ones too."""
    writer = runlog.RunLogWriter(tmp_path)
    writer.write("epoch", epoch=1, seconds=1.0, images_per_sec=10.0, train_loss=float("nan"),
                 val_auroc={"Edema": float("inf"), "Mass": 0.75}, per_rank=[1.0, float("-inf")])
    writer.close()

    def strict(constant):
        raise AssertionError(f"{constant} in the run log")

    record = json.loads((tmp_path / "runlog.jsonl").read_text(), parse_constant=strict)
    assert (record["train_loss"], record["val_auroc"], record["per_rank"]) == (None, {"Edema": None, "Mass": 0.75}, [1.0, None])
