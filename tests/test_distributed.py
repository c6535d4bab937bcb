"""The rules of the engine seam's start-up (chexnet_hvd.distributed) and the tf engine's launcher,
as pure functions: which GPU a rank takes, how many threads it gets, where a tf worker sits in
its cluster and listens, and what exit code a job of workers ends with. (Run for real on every
multi-rank test and template.)"""

import json

import pytest

from chexnet_hvd import launch
from chexnet_hvd.cli import InputError
from chexnet_hvd.distributed import workers_flag
from chexnet_hvd.placement import gpu_index, threads_for
from chexnet_hvd.tf_engine import local_ranks, tf_cluster, tf_port_base


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


def test_tf_ports_differ_per_job_and_per_worker_and_can_be_set(monkeypatch):
    monkeypatch.delenv("CHEXNET_TF_PORT", raising=False)
    assert tf_port_base("4242") != tf_port_base("4243")
    assert all(20000 <= tf_port_base(str(job)) <= 65535 - 100 for job in range(0, 5000, 7))
    monkeypatch.setenv("CHEXNET_TF_PORT", "31000")
    assert tf_port_base("4242") == 31000
    for bad in ("3l000", "70000", "-1"):
        monkeypatch.setenv("CHEXNET_TF_PORT", bad)
        with pytest.raises(InputError, match=f"CHEXNET_TF_PORT: '{bad}' is not a port number"):
            tf_port_base("4242")


def test_tf_config_is_read_and_a_broken_one_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert tf_cluster() == (["a:1", "b:2"], 1)
    for broken in ("{", json.dumps({"cluster": {}}), json.dumps(
            {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}})):
        monkeypatch.setenv("TF_CONFIG", broken)
        with pytest.raises(InputError, match="TF_CONFIG"):
            tf_cluster()


def test_a_slurm_step_names_its_workers_in_slurms_node_order(monkeypatch):
    """node9 before node10, as Slurm numbers the tasks (sorted as text, node10 came first and
    each worker was named by the other's address); 2 tasks on node9, 1 on node10."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for key, value in {"SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NODELIST": "node[9-10]",
                       "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_PROCID": "2", "SLURM_JOB_ID": "5"}.items():
        monkeypatch.setenv(key, value)
    base = tf_port_base("5")
    assert tf_cluster() == ([f"node9:{base}", f"node9:{base + 1}", f"node10:{base + 2}"], 2)
    monkeypatch.setenv("CHEXNET_TF_PORT", "65534")  # 3 workers need 65534..65536
    with pytest.raises(InputError, match="CHEXNET_TF_PORT: 65534: 3 workers' ports"):
        tf_cluster()


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
