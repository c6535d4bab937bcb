"""The rules of the one Horovod start-up (chexnet_hvd.distributed), as pure functions: which GPU a
rank takes and how many threads it gets. (Run for real on every multi-rank test and template.)"""

import pytest

from chexnet_hvd.cli import InputError
from chexnet_hvd.distributed import gpu_index, threads_for


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
