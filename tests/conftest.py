"""Shared fixtures: a small synthetic dataset, its records, a small CNN trained on them and one
trained on planted findings (each made once per test run, whichever pytest-xdist worker needs
it first), a helper that runs the suite's CLIs as real processes, and a local HTTP server with
Range support."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from xdist.scheduler import LoadFileScheduling

import chexnet_hvd  # noqa: F401  (first: on the TF 2.21 lane it selects Keras 2 before TensorFlow loads)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared"


def run(args: list[str], timeout: float = 600, env: dict | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run a command from the repo root with the venv first on PATH; capture text output."""
    # PYTHON: the shell wrappers (write_tfrecords.sh, ...) run this lane's Python, not .venv's
    full_env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
                             "PYTHON": sys.executable}
    proc = subprocess.run(args, cwd=ROOT, env=full_env | (env or {}), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def module(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m chexnet_hvd.<name> args...` as a real process."""
    return run([sys.executable, "-m", f"chexnet_hvd.{name}", *map(str, args)], **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """The suite's error convention: exit 2, one `error: ...` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


class Crash(Exception):
    """What `crash_at` raises in place of a file operation: a job killed at that point."""


def crash_at(monkeypatch, n: int, operations) -> list:
    """Make the n-th call (from 0) to any of `operations` ((module, name) pairs, e.g. (os,
    "replace")) raise Crash instead of running: a kill between two steps of a commit. Returns
    the calls seen so far (their names)."""
    calls: list[str] = []

    def crashing(real):
        def call(*args, **kwargs):
            calls.append(real.__name__)
            if len(calls) == n + 1:
                raise Crash
            return real(*args, **kwargs)
        return call

    for module_, name in operations:
        monkeypatch.setattr(module_, name, crashing(getattr(module_, name)))
    return calls


@contextlib.contextmanager
def small_disk(path: Path, size: str = "16m"):
    """A file system of `size` mounted at `path` (a tmpfs: root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its file system is full; the file. (The close can fail
    too: the file's buffer holds the last write's bytes that did not fit.)"""
    filler = folder / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    return filler


ENGINES = ["horovod", "tf"]
HOROVOD = importlib.util.find_spec("horovod") is not None
# The slow tests the TF 2.21 lane runs besides the fast set (`make test TF=2.21`): where another
# TensorFlow, Keras or OpenVINO could behave differently (the tf engine's collectives, resume,
# mixed precision, the backbones, gradients for maps, export), one test each; the default lane
# runs every test.
LANE = {
    "test_two_ranks.py::test_weights_bitwise_identical_on_both_ranks[tf]",
    "test_two_ranks.py::test_validation_auroc_equals_single_process[tf]",
    "test_two_ranks.py::test_a_run_that_succeeds_ends_without_error_lines[tf]",
    "test_resume_preemption.py::test_resumes_at_an_epochs_end_and_in_mid_epoch_are_exact[tf]",
    "test_resume_preemption.py::test_sigterm_checkpoints_and_exits_75[tf]",
    "test_resume_preemption.py::test_a_rank_gone_at_the_last_barrier_leaves_the_others_exit_code[tf-preempted]",
    "test_train_flags.py::test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank[tf]",
    "test_models_precision.py::test_every_model_builds_and_takes_a_step[densenet121-32]",
    "test_models_precision.py::test_every_model_builds_and_takes_a_step[resnet59-64]",
    "test_models_precision.py::test_the_training_loss_is_masked_bce_for_any_number_of_classes[tf]",
    "test_records_data.py::test_uint8_records_and_preprocessing_in_the_model_graph_match_the_png_path",
    "test_evaluate.py::test_evaluate_on_two_ranks_equals_one_and_writes_the_report[tf]",
    "test_export.py::test_openvino_fp32_equals_tensorflow",
    "test_predict.py::test_cam_files_and_bad_input",
    "test_stalls.py::test_a_stopped_rank_ends_the_job_by_name[launch-rank1]",
    "test_stalls.py::test_a_suspension_past_the_engines_own_timeout_ends_the_attempt_as_stalled",
    "test_recipes_weights.py::test_resnet59_starts_from_resnet50_where_the_shapes_match",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    """Tests parametrised with an engine (`engine`, or the `two_ranks` fixture) are marked
    tf_engine under tf. Where Horovod is not installed (the TF 2.21 lane), the tests that need
    it are skipped: those under Horovod or marked `horovod`, and those on the Slurm rehearsal
    cluster (its jobs run the default lane's .venv). The tests named in LANE are marked `lane`."""
    skip = pytest.mark.skip(reason="needs Horovod or the default lane, which this lane is not")
    found = {item.nodeid.removeprefix("tests/") for item in items} & LANE
    if "lane" in (config.option.markexpr or "") and found != LANE:  # a renamed test left the lane
        raise pytest.UsageError(f"conftest LANE names tests that do not exist: {sorted(LANE - found)}")
    for item in items:
        if item.nodeid.removeprefix("tests/") in found:
            item.add_marker(pytest.mark.lane)
        params = item.callspec.params if hasattr(item, "callspec") else {}
        engine = params.get("engine", params.get("two_ranks"))
        if engine == "tf":
            item.add_marker(pytest.mark.tf_engine)
        if not HOROVOD and (engine == "horovod" or item.get_closest_marker("horovod")
                            or "cluster" in item.fixturenames):
            item.add_marker(skip)


# The longest test files (measured) first, so that the two pytest-xdist workers (each file on
# one) end together, not one idling while the other runs a long file it drew last (pytest-xdist
# hands out the files with the most tests first: test_learning.py's 2 tests, 3 minutes, came
# last). The rehearsal's other file goes last: it waits for the cluster while test_slurm.py
# holds it.
FIRST = ["test_slurm.py", "test_resume_preemption.py", "test_two_ranks.py", "test_train_flags.py",
         "test_hostile_inputs.py", "test_nas.py", "test_stalls.py", "test_evaluate.py",
         "test_models_precision.py", "test_recipes_weights.py", "test_views.py", "test_learning.py",
         "test_check.py", "test_own_data.py", "test_records_data.py", "test_export.py"]


def file_order(scope: str) -> int:
    name = Path(scope.split("::")[0]).name
    return FIRST.index(name) if name in FIRST else len(FIRST) + (name == "test_rehearsal_network.py")


class LongestFirst(LoadFileScheduling):
    """--dist loadfile with the files handed out in `file_order` (pytest-xdist 3.6, pinned in
    constraints.txt, fills `workqueue` in schedule() and takes work from its front)."""

    ordered = False

    def _assign_work_unit(self, node) -> None:
        if not self.ordered:
            queue = sorted(self.workqueue.items(), key=lambda scope: file_order(scope[0]))
            self.workqueue.clear()
            self.workqueue.update(queue)
            self.ordered = True
        super()._assign_work_unit(node)


def pytest_xdist_make_scheduler(config, log):
    return LongestFirst(config, log) if config.getvalue("dist") == "loadfile" else None


BATCH_NORM_MODEL = "nas-01201120"  # a small search candidate with batch normalisation


def launcher(engine: str, n: int) -> list[str]:
    """What starts n ranks of `engine` here: horovodrun over Gloo, or the tf engine's launcher."""
    from chexnet_hvd.distributed import engine_class

    return engine_class(engine).launcher(n)


def ranks(engine: str, n: int, *command) -> list[str]:
    """`command` (a python -m chexnet_hvd.train or .evaluate invocation) on n ranks of `engine`,
    told which engine it runs under."""
    return [*launcher(engine, n), *map(str, command), "--engine", engine]


def rank_of(pid: int) -> int | None:
    """The rank a trainer process is, from what its launcher put in its environment (None for
    a launcher's own processes and the shells it starts the trainer in)."""
    try:
        if "python" not in os.readlink(f"/proc/{pid}/exe"):
            return None
        env = dict(line.split("=", 1) for line in open(f"/proc/{pid}/environ").read().split("\0") if "=" in line)
    except OSError:
        return None
    for var in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK"):
        if var in env:
            return int(env[var])
    return json.loads(env["TF_CONFIG"])["task"]["index"] if "TF_CONFIG" in env else None


def ranks_of(run_dir, command: str = "chexnet_hvd.train") -> dict[int, int]:
    """{rank: pid} of the `command` processes (the trainer's) with `run_dir` in their arguments
    (their launchers left out)."""
    pids = subprocess.run(["pgrep", "-f", f"{command}.*{run_dir}"], capture_output=True, text=True).stdout
    found = {rank_of(int(p)): int(p) for p in pids.split()}
    return {r: p for r, p in found.items() if r is not None}


def reported_bottleneck(run_dir) -> str:
    """The bottleneck column of tools/scaling_report.py's row for a run of one world size."""
    out = run([sys.executable, str(ROOT / "tools" / "scaling_report.py"), str(run_dir)], check=True).stdout
    [row] = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return row.split(" | ")[-2]


def assert_ranks_identical(run_dir, ranks: int = 2) -> None:
    """--audit's final weights of every rank, bitwise equal (not approximately)."""
    import numpy as np

    first = np.load(run_dir / "audit" / "rank0.npz")
    for rank in range(1, ranks):
        other = np.load(run_dir / "audit" / f"rank{rank}.npz")
        assert first.files == other.files
        for key in first.files:
            assert np.array_equal(first[key], other[key]), (rank, key)


@pytest.fixture(scope="module")
def cluster():
    """The Slurm rehearsal cluster up (tools/slurm_local.sh), for one test file at a time: the
    files that use it may run on two pytest-xdist workers, and one shapes or cuts the links the
    other's jobs cross. Skipped when not root."""
    if os.geteuid() != 0:
        pytest.skip("the rehearsal cluster needs root (slurmd, munged, network namespaces)")
    with open("/tmp/chexnet-rehearsal.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run(["bash", "tools/slurm_local.sh", "up"], check=True, timeout=600)  # also restores every link
        yield True


def made_once(tmp_path_factory, name: str, make) -> Path:
    """`make(out)`'s output, made by the first worker of the test run that asks (the others wait
    for it, then read it): one folder under the run's temporary root, which every pytest-xdist
    worker's own lies in. What tests read from it, they must not change."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed making it
            make(out)
            (root / f"{name}.done").touch()
    return out


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """600 synthetic 32-px images with their CSV."""
    return made_once(tmp_path_factory, "synthetic", lambda out: module(
        "synthetic", "--out", out, "--images", 600, "--size", 32, "--seed", 1, check=True))


@pytest.fixture(scope="session")
def records_dir(synthetic, tmp_path_factory) -> Path:
    """Records of the synthetic set: 64-record shards, so every split has several files."""
    return made_once(tmp_path_factory, "records", lambda out: module(
        "records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images",
        "--out", out, "--shard-size", 64, "--workers", 2, "--no-progress", check=True))


@pytest.fixture(scope="session")
def raw_dir(synthetic, tmp_path_factory) -> Path:
    """A raw-image index of the synthetic set (same split as records_dir: same seed)."""
    return made_once(tmp_path_factory, "raw", lambda out: module(
        "records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images",
        "--out", out, "--format", "raw", "--no-progress", check=True))


@pytest.fixture(scope="session")
def checkpoint(records_dir, tmp_path_factory) -> Path:
    """The best checkpoint of 3 epochs of the small CNN on records_dir's 32-px records."""
    run_dir = made_once(tmp_path_factory, "eval_run", lambda out: module(
        "train", "--data", records_dir, "--run-dir", out, "--model", "small_cnn", "--image-size", 32,
        "--batch-size", 16, "--epochs", 3, "--verbose", 0, check=True, timeout=300))
    return run_dir / "checkpoints" / "best"


def train_cnn(root: Path) -> None:
    module("synthetic", "--out", root / "syn", "--images", 1500, "--size", 64, "--seed", 2, check=True)
    module("records", "--csv", root / "syn" / "Data_Entry_2017.csv", "--images", root / "syn" / "images",
           "--out", root / "records", "--no-progress", check=True)
    module("train", "--data", root / "records", "--run-dir", root / "run", "--model", "small_cnn",
           "--image-size", 64, "--batch-size", 32, "--epochs", 10, "--deterministic", "--verbose", 0,
           check=True, timeout=600)


@pytest.fixture(scope="session")
def trained_cnn(tmp_path_factory) -> Path:
    """A small CNN trained on 1,500 64-px synthetic images with planted findings (about 30 s):
    root/syn (images, planted.csv), root/records, root/run/checkpoints/best. Deterministic (the
    activation-map test's hit rate varied around its bound with the batch order)."""
    return made_once(tmp_path_factory, "trained", train_cnn)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support; cuts the first transfer of files named in
    `server.cut` after half their bytes, answers 503 to the first `server.unavailable[name]`
    requests of a file, and records every request's Range header."""

    def do_GET(self):
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        self.server.log.append((path.name, rng))
        if self.server.unavailable.get(path.name, 0) > 0:
            self.server.unavailable[path.name] -= 1
            self.send_error(503)
            return
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if path.name in self.server.cut:
            self.server.cut.discard(path.name)
            self.wfile.write(body[start:start + len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a: RangeHandler(*a, directory=str(root)))
    httpd.log, httpd.cut, httpd.unavailable = [], set(), {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
