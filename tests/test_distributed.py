"""The rules of the engine seam's start-up (chexnet_hvd.distributed) and the tf engine's launcher,
as pure functions: which GPU a rank takes, how many threads it gets, where a tf worker sits in
its cluster and listens, and what exit code a job of workers ends with; and the start-up's
watcher on a stand-in rank. (Run for real on every multi-rank test and template.)"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from chexnet_hvd import launch, runlog, scaling
from chexnet_hvd.cli import InputError
from chexnet_hvd.distributed import workers_flag
from chexnet_hvd.placement import gpu_index, threads_for
from chexnet_hvd.tf_engine import local_ranks, own_port, rendezvous, ring_places, tf_cluster


def test_a_rank_takes_its_local_ranks_gpu_or_the_only_one_it_was_given():
    assert [gpu_index(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]  # --gres=gpu:4, 4 tasks a node
    assert [gpu_index(r, 4, 1) for r in range(4)] == [0, 0, 0, 0]  # srun --gpus-per-task=1
    assert gpu_index(0, 2, 0) is None  # no GPUs
    with pytest.raises(InputError, match="local rank 2 of 3 .* only 2 GPUs visible"):
        gpu_index(2, 3, 2)


def test_threads_are_the_ranks_own_cpus_when_bound_else_a_share_of_the_node():
    assert threads_for(cpus=8, local_size=4, machine_cpus=32) == 8  # bound to its 8 (srun -c 8)
    assert threads_for(cpus=32, local_size=4, machine_cpus=32) == 8  # unbound: a quarter each
    assert threads_for(cpus=2, local_size=4, machine_cpus=2) == 1  # more ranks than cores


def test_a_tf_worker_finds_its_place_among_the_workers_on_its_host():
    workers = ["node1:20000", "node1:20001", "node2:20002", "node2:20003"]
    assert [local_ranks(workers, i) for i in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert local_ranks([], 0) == (0, 1)  # a world of one


def test_a_tf_worker_listens_on_a_free_port_a_reserved_one_or_the_range_it_is_given(monkeypatch):
    for var in ("CHEXNET_TF_PORT", "SLURM_STEP_RESV_PORTS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    port, holder = own_port()
    with socket.socket() as s:  # held: no other process is given it
        with pytest.raises(OSError):
            s.bind(("", port))
    holder.close()
    with socket.socket() as s:  # released: free for the worker's server
        s.bind(("", port))
    monkeypatch.setenv("SLURM_STEP_RESV_PORTS", "12000-12001,12005")  # srun --resv-ports
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert own_port() == (12005, None)
    monkeypatch.setenv("SLURM_LOCALID", "3")  # fewer reserved than tasks: never two on one port
    with pytest.raises(InputError, match="3 port.s. reserved on this node for task 3"):
        own_port()
    monkeypatch.setenv("CHEXNET_TF_PORT", "31000")  # a range a firewall opens: base + rank
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert own_port() == (31003, None)
    for bad in ("3l000", "70000"):
        monkeypatch.setenv("CHEXNET_TF_PORT", bad)
        with pytest.raises(InputError, match=f"CHEXNET_TF_PORT: '{bad}' plus the worker's Slurm task number"):
            own_port()


def slurm_views(shared, job: str, tasks: dict[str, int]) -> list:
    """What each task of a Slurm step sees as its cluster (tf_cluster in a process of its own,
    all at once, with the step's variables), in task order."""
    nodes = list(tasks)
    env = {"SLURM_STEP_NUM_TASKS": str(sum(tasks.values())), "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
           "SLURM_STEP_NODELIST": ",".join(nodes), "SLURM_STEP_TASKS_PER_NODE": ",".join(map(str, tasks.values()))}
    code = ("import json, sys; from pathlib import Path; from chexnet_hvd.tf_engine import tf_cluster; "
            "print(json.dumps(tf_cluster(Path(sys.argv[1]))))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shared)], stdout=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CHEXNET_TF"))}
                              | env | {"SLURM_PROCID": str(i)})
             for i in range(sum(tasks.values()))]
    return [json.loads(p.communicate(timeout=120)[0]) for p in procs]


@pytest.mark.slow
def test_a_slurm_step_names_its_workers_in_slurms_node_order_with_ports_they_chose(tmp_path):
    """node9 before node10, as Slurm numbers the tasks (sorted as text, node10 came first and
    each worker was named by the other's address); 2 tasks on node9, 1 on node10. Every worker
    sees the same list; its own entry is its own port."""
    views = slurm_views(tmp_path, "5", {"node9": 2, "node10": 1})
    assert [index for _, index in views] == [0, 1, 2]
    workers = views[0][0]
    assert all(view[0] == workers for view in views)
    assert [w.rsplit(":", 1)[0] for w in workers] == ["node9", "node9", "node10"]
    assert len({w for w in workers}) == 3


def test_tfs_ring_goes_node_by_node_through_a_slurm_steps_workers():
    """TF's ring visits 16 workers as 0, 1, 10, 11, ..., 15, 2, ..., 9 (their device names as
    text): with Slurm's task p as worker p, 4 per node, it crossed node1's and node3's links
    twice each (each sent 3.76x an allreduce's bytes, node2 and node4 1.88x, on the rehearsal).
    Slurm's tasks take the worker indices in that order: the ring meets them node by node, each
    task keeps its own host, and below 11 workers nothing changes."""
    tf_ring = [0, 1, 10, 11, 12, 13, 14, 15, 2, 3, 4, 5, 6, 7, 8, 9]
    hosts = [f"node{1 + task // 4}" for task in range(16)]
    by_index, index_of = ring_places(hosts)
    assert [by_index[i] for i in tf_ring] == hosts
    assert [by_index[index_of[task]] for task in range(16)] == hosts and sorted(index_of) == list(range(16))
    assert ring_places(hosts[:10]) == (hosts[:10], list(range(10)))


@pytest.mark.parametrize("nodes,per_node", [(4, 4), (4, 8), (3, 4)])
def test_each_task_of_a_large_slurm_step_is_a_worker_on_its_node_with_its_local_id(monkeypatch, tmp_path,
                                                                                  nodes, per_node):
    """tf_cluster in every task of a step of 11 or more (the address exchange stubbed): distinct
    worker indices, the chief Slurm's task 0, each worker named by its own node, and its local
    rank (its GPU, beside the CPUs srun bound) its SLURM_LOCALID."""
    from chexnet_hvd import tf_engine

    addresses = {}
    monkeypatch.setattr(tf_engine, "own_port", lambda: (7000, None))
    monkeypatch.setattr(tf_engine, "rendezvous", lambda folder, me, count, address: addresses.setdefault(me, address)
                        and [address if i == me else "" for i in range(count)])
    for var, value in {"SLURM_STEP_NUM_TASKS": nodes * per_node, "SLURM_STEP_NODELIST": f"node[1-{nodes}]",
                       "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_JOB_ID": 7}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("TF_CONFIG", raising=False)
    index_of = {}
    for task in range(nodes * per_node):
        monkeypatch.setenv("SLURM_PROCID", str(task))
        index_of[task] = tf_cluster(tmp_path)[1]
    workers = [addresses[i] for i in range(nodes * per_node)]
    assert sorted(index_of.values()) == list(range(nodes * per_node)) and index_of[0] == 0
    for task, index in index_of.items():
        assert workers[index] == f"node{1 + task // per_node}:7000"
        assert local_ranks(workers, index) == (task % per_node, per_node)


@pytest.mark.slow
def test_two_jobs_on_one_node_never_collide_whatever_their_ids(tmp_path):
    """Job ids 5 and 405 (equal mod 400: a port formula of the job id gave both the same
    ports) on one node at once: four distinct ports."""
    first = slurm_views(tmp_path, "5", {"localhost": 2})
    second = slurm_views(tmp_path, "405", {"localhost": 2})
    assert len(set(first[0][0]) | set(second[0][0])) == 4


def test_a_worker_that_never_shows_up_is_named(tmp_path):
    with pytest.raises(InputError, match=r"workers \[1\] never wrote their address"):
        rendezvous(tmp_path / "step", 0, 2, "localhost:1", wait=0.5)


def test_tf_config_is_read_and_a_broken_one_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert tf_cluster() == (["a:1", "b:2"], 1)
    for broken in ("{", json.dumps({"cluster": {}}), json.dumps(
            {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}})):
        monkeypatch.setenv("TF_CONFIG", broken)
        with pytest.raises(InputError, match="TF_CONFIG"):
            tf_cluster()
    # a chief beside the workers (tf.distribute's other layout): the chief and worker 0 would
    # both be rank 0 and write one run directory
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
                                                "task": {"type": "chief", "index": 0}}))
    with pytest.raises(InputError, match="TF_CONFIG: has chief tasks; this trainer's ranks are all 'worker'"):
        tf_cluster()
    # an empty role, or a task without a type, names no second rank 0
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": [], "worker": ["a:1", "b:2"]}, "task": {"index": 1}}))
    assert tf_cluster() == (["a:1", "b:2"], 1)


def test_a_peer_that_left_is_told_apart_from_a_local_error_of_the_same_type():
    """The engines' errors when another rank left (which end a rank with one line) against a
    local file error TF reports with the same type (which keeps its traceback)."""
    import tensorflow as tf

    from chexnet_hvd.horovod_engine import Horovod
    from chexnet_hvd.tf_engine import TensorFlow

    aborted = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket closed")
    stale = tf.errors.AbortedError(None, None, "/scratch/train-00001.tfrecord; Stale file handle")
    shut = tf.errors.UnknownError(None, None, "Horovod has been shut down. This was caused by an exception on one of the ranks")
    assert TensorFlow.peer_left(None, aborted) and not TensorFlow.peer_left(None, stale)
    assert Horovod.peer_left(None, shut) and not Horovod.peer_left(None, stale)


def test_workers_flags_name_the_cluster_and_bad_ones_are_one_line_errors():
    assert workers_flag("tf", "", 0) is None
    assert workers_flag("tf", "a:1,b.example:2,[::1]:3", 2) == (["a:1", "b.example:2", "[::1]:3"], 2)
    for workers, index, flag, words in (("a:1,b:2", 2, "--worker-index", "names 2"),
                                        ("", 1, "--worker-index", "needs --workers"),
                                        ("a:1,b", 0, "--workers", "'b' is not host:port"),
                                        ("a:1,:2", 0, "--workers", "':2'"),
                                        ("a:99999", 0, "--workers", "'a:99999'")):
        with pytest.raises(InputError, match=words) as err:
            workers_flag("tf", workers, index)
        assert str(err.value).startswith(flag)
    with pytest.raises(InputError, match="for --engine tf"):
        workers_flag("horovod", "a:1,b:2", 0)


def test_a_job_of_workers_ends_with_the_first_failure_else_their_common_code():
    assert launch.outcome([0, 0]) == 0
    assert launch.outcome([75, 75]) == 75  # preempted together: requeue
    assert launch.outcome([75, 1]) == 1  # a crash is not a preemption
    assert launch.outcome([0, -9]) == 128 + 9  # killed by SIGKILL, as a shell reports it
    assert launch.outcome([0, 75]) == 75


@pytest.mark.parametrize("horovod,engine", [(True, "horovod"), (False, "tf")])
def test_the_default_engine_is_horovod_where_installed_else_tf(horovod, engine):
    """Without CHEXNET_ENGINE, --engine (and the Slurm templates' ENGINE, which ask the package)
    defaults to horovod only where it can be imported: the lane of the newest TensorFlow has no
    Horovod, and each rank there failed on `import horovod` with a traceback."""
    if horovod and importlib.util.find_spec("horovod") is None:
        pytest.skip("Horovod is not installed in this lane")
    hide = "" if horovod else "sys.modules['horovod'] = None; "  # as if it were not installed
    code = f"import sys; {hide}from chexnet_hvd.distributed import DEFAULT_ENGINE; print(DEFAULT_ENGINE)"
    env = {k: v for k, v in os.environ.items() if k != "CHEXNET_ENGINE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == engine


def test_the_start_up_watcher_kills_its_rank_past_the_bound_naming_what_it_last_did():
    """stall.StartUp's watcher (its own process: a rank stuck while holding the GIL cannot act),
    on a stand-in rank: phases sent together are read to the last; past the bound it names the
    last and kills the rank; a start-up that ends first (its pipe closed) ends it quietly."""
    watcher = [sys.executable, "chexnet_hvd/stall.py"]
    rank = subprocess.Popen(["sleep", "60"])
    proc = subprocess.Popen([*watcher, str(rank.pid), "1.5", "1"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdin.write("opening the records\nstarting the tf engine\n")  # the pipe kept open: still starting
    proc.stdin.flush()
    assert rank.wait(timeout=10) == -9
    assert proc.stderr.read() == (f"error: stalled: {socket.gethostname()} (pid {rank.pid}) still starting the tf engine "
                           "after 1.5 s of start-up (--stall-timeout 1 plus a minute); killing it, which ends the job\n")
    rank = subprocess.Popen(["sleep", "60"])
    proc = subprocess.run([*watcher, str(rank.pid), "30", "1"], input="", capture_output=True, text=True, timeout=10)
    assert (proc.returncode, proc.stderr, rank.poll()) == (0, "", None)
    rank.kill()


def test_start_up_watchers_that_fire_together_log_one_stall_for_their_attempt(tmp_path):
    """Every rank's start-up watcher may fire (a rank stuck, the others waiting for it): the
    run log gets one stalled end record for the attempt, after the attempt before it (which
    keeps its own ending) and its torn last line, so the Slurm templates requeue the job once
    and a second stall in a row ends it."""
    writer = runlog.RunLogWriter(tmp_path)
    writer.write("start", world_size=2, local_batch=8, model="small_cnn", image_size=8, precision="fp32")
    writer.write("epoch", epoch=1, seconds=1.0, images_per_sec=10.0)
    writer.write("end", status="preempted", step=3, epoch=1)
    writer.close()
    with open(tmp_path / runlog.FILENAME, "a") as fh:
        fh.write('{"schema": "chexnet_hvd.runlog/1", "ev')  # torn by a kill
    before = runlog.records(tmp_path)
    record = json.dumps({"schema": runlog.SCHEMA, "event": "end", "status": "stalled", "before_start": True})
    ranks = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    watchers = [subprocess.Popen([sys.executable, "chexnet_hvd/stall.py", str(rank.pid), "1", "1",
                                  str(tmp_path / runlog.FILENAME), record],
                                 stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in ranks]
    for watcher in watchers:
        watcher.stdin.write("starting the tf engine (waiting for every rank to join)\n")
        watcher.stdin.flush()
    for rank, watcher in zip(ranks, watchers, strict=True):
        assert rank.wait(timeout=10) == -9
        assert watcher.wait(timeout=10) == 0
    records, skipped = runlog.read_records(tmp_path)
    assert (len(records) - before, skipped) == (1, [4])
    assert (records[-1]["status"], records[-1]["hosts"], records[-1]["before_start"]) == \
        ("stalled", [socket.gethostname()], True)
    assert records[-1]["error"].startswith(f"stalled: {socket.gethostname()} (pid ")
    assert "still starting the tf engine (waiting for every rank to join) after 1 s" in records[-1]["error"]
    assert (runlog.status(tmp_path, before), runlog.stalled_in_a_row(tmp_path)) == ("stalled", 1)
    assert [a.status for a in scaling.load_runs(tmp_path / runlog.FILENAME)] == ["preempted"]
