"""The rehearsal cluster's network (tools/slurm_local.sh): every node in its own network
namespace with its own address, hostname and link to one bridge; a link can be slowed to a
bandwidth or cut, and that changes what really crosses it. Open MPI and Horovod's Gloo run
across the nodes."""

import json
import re
import socket
import sys
from contextlib import contextmanager

import pytest
from conftest import run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = ["bash", "tools/slurm_local.sh"]
NODES = [f"node{i}" for i in range(1, 5)]
SLURMD_PORT = 6818

# Run in each task of a step: what the node looks like from inside.
INSIDE = """
import json, socket, subprocess
ip = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True, check=True).stdout
print(json.dumps({"host": socket.gethostname(),
                  "resolves": socket.gethostbyname(socket.gethostname()),
                  "addresses": [l.split()[1] + " " + l.split()[3] for l in ip("-4", "-o", "addr").splitlines()],
                  "up": sorted(l.split(":")[1].strip().split("@")[0] for l in ip("-o", "link", "show", "up").splitlines()),
                  "routes": [l.strip() for l in ip("-4", "route").splitlines()]}))
"""

# Two tasks: task 0 listens; task 1 connects to it by host name, sends N bytes, waits for a
# one-byte receipt, then receives N bytes and sends the receipt. Each sender prints its rate.
TRANSFER = """
import json, os, socket, sys, time
server, port, size = sys.argv[1], 17999, int(sys.argv[2])

def send(sock):
    start = time.monotonic()
    sock.sendall(bytes(size))
    assert sock.recv(1) == b"k"
    print(json.dumps({"from": socket.gethostname(), "mbit_per_s": size * 8 / 1e6 / (time.monotonic() - start)}))

def receive(sock):
    got = 0
    while got < size:
        got += len(sock.recv(1 << 20))
    sock.sendall(b"k")

if os.environ["SLURM_PROCID"] == "0":
    listener = socket.create_server(("", port))
    sock = listener.accept()[0]
    receive(sock)
    send(sock)
else:
    for _ in range(100):
        try:
            sock = socket.create_connection((server, port), timeout=30)
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    send(sock)
    receive(sock)
"""


# One Horovod rank per task, told its place by Slurm's variables as horovodrun's Gloo launcher
# would tell it; Gloo then meets at the rendezvous server on this machine and rings over eth0.
GLOO_RANK = """
import json, os, socket
e = os.environ
nodes, tasks = int(e["SLURM_NNODES"]), int(e["SLURM_NTASKS"])
os.environ.update(HOROVOD_RANK=e["SLURM_PROCID"], HOROVOD_SIZE=str(tasks), HOROVOD_LOCAL_RANK=e["SLURM_LOCALID"],
                  HOROVOD_LOCAL_SIZE=str(tasks // nodes), HOROVOD_CROSS_RANK=e["SLURM_NODEID"],
                  HOROVOD_CROSS_SIZE=str(nodes), HOROVOD_HOSTNAME=socket.gethostname())
import horovod.tensorflow as hvd
import tensorflow as tf
hvd.init()
total = hvd.allreduce(tf.constant([float(hvd.rank() + 1)] * 1000), op=hvd.Sum)
print(json.dumps({"host": socket.gethostname(), "rank": hvd.rank(), "size": hvd.size(),
                  "cross_size": hvd.cross_size(), "gloo": hvd.gloo_enabled(), "sum": sorted(set(total.numpy().tolist()))}))
"""

@pytest.fixture(scope="module")
def cluster_net(cluster):
    """The cluster up, and every link restored when the module is done."""
    yield
    run([*SCRIPT, "up"], check=True)


@contextmanager
def link(node: str, *setting: str):
    """`slurm_local.sh link NODE SETTING...` for the duration of the block, then restored."""
    run([*SCRIPT, "link", node, *setting], check=True)
    try:
        yield
    finally:
        restore = ("rate", "unlimited") if setting[0] == "rate" else ("up",)
        run([*SCRIPT, "link", node, *restore], check=True)


def step(*args: str, timeout: float = 120) -> list[dict]:
    """srun a Python step (no MPI); one JSON object per printed line."""
    proc = run(["srun", "--mpi=none", *args], timeout=timeout, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def transfer(megabytes: int) -> dict[str, float]:
    """Mbit/s node2 -> node1 and node1 -> node2 over a TCP connection made by host name."""
    found = step("-w", "node1,node2", "-N2", "-n2", sys.executable, "-c", TRANSFER, "node1",
                 str(megabytes * 10**6))
    return {f["from"]: f["mbit_per_s"] for f in found}


def can_connect(host: str, port: int = SLURMD_PORT, timeout: float = 3) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def test_each_node_has_its_own_address_hostname_and_nothing_else(cluster_net):
    """Four tasks on node[1-4]: each sees its own hostname, which resolves to its own address,
    the only one on its eth0; loopback is up; no route leaves the rehearsal's subnet."""
    seen = step("-N4", "--ntasks-per-node=1", sys.executable, "-c", INSIDE)
    assert sorted(s["host"] for s in seen) == NODES
    for s in seen:
        number = int(s["host"].removeprefix("node"))
        address = f"10.231.0.{10 + number}"
        assert s["resolves"] == address
        assert s["addresses"] == ["lo 127.0.0.1/8", f"eth0 {address}/24"]
        assert s["up"] == ["eth0", "lo"]
        assert s["routes"] == [f"10.231.0.0/24 dev eth0 proto kernel scope link src {address}"]
    assert len({s["resolves"] for s in seen}) == 4


def test_a_shaped_link_carries_its_rate_both_ways(cluster_net):
    """node2's link at 100 Mbit/s: 16 MB each way between node1 and node2 (1.3 s: a moment's
    descheduling is a small part of it) move at 70-110% of it; unshaped, the same transfer is
    more than 3x faster."""
    free = transfer(16)
    with link("node2", "rate", "100mbit"):
        shaped = transfer(16)
    print(f"16 MB each way, Mbit/s: unshaped {free}, node2 at 100mbit {shaped}")
    assert set(shaped) == {"node1", "node2"}
    for sender, rate in shaped.items():
        assert 70 <= rate <= 110, (sender, shaped)
        assert free[sender] > 3 * 100, (sender, free)
    status = run([*SCRIPT, "status"]).stdout
    assert re.search(r"node2 10\.231\.0\.12 up unlimited", status), status


def test_a_cut_link_cuts_and_comes_back(cluster_net):
    """node2's link down: neither node1 nor this machine reach node2's slurmd; after `up`,
    both do."""
    probe = f"import socket; socket.create_connection(('node2', {SLURMD_PORT}), timeout=3); print('{{}}')"
    assert can_connect("node2")
    with link("node2", "down"):
        assert not can_connect("node2")
        cut = run(["srun", "--mpi=none", "-w", "node1", sys.executable, "-c", probe], timeout=60)
        assert cut.returncode != 0 and "timed out" in cut.stderr, cut.stderr[-2000:]
        assert re.search(r"node2 10\.231\.0\.12 down", run([*SCRIPT, "status"]).stdout)
    assert can_connect("node2")
    assert step("-w", "node1", sys.executable, "-c", probe) == [{}]


def test_up_restores_every_link(cluster_net):
    run([*SCRIPT, "link", "node3", "rate", "10mbit"], check=True)
    run([*SCRIPT, "link", "node4", "down"], check=True)
    run([*SCRIPT, "up"], check=True)
    status = run([*SCRIPT, "status"], check=True).stdout
    for node in NODES:
        assert re.search(rf"{node} \S+ up unlimited", status), status


@pytest.mark.parametrize("args,error", [
    (["node9", "down"], "error: node9: no such rehearsal node"),
    (["node1", "rate", "fast"], "error: link node1 rate: 'fast' is not a rate"),
    (["node1", "sideways"], "error: link node1: 'sideways' is not rate, up or down")], ids=str)
def test_link_refuses_what_it_cannot_do(cluster_net, args, error):
    proc = run([*SCRIPT, "link", *args])
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(error), proc.stderr


@pytest.mark.horovod
def test_horovod_gloo_allreduces_across_nodes(cluster_net):
    """Horovod over Gloo (not MPI) on 2 nodes x 2 ranks started by srun: every rank meets the
    rendezvous on this machine's bridge address and the allreduce is right on every rank."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer()
    port = server.start()
    server.init(get_host_assignments(parse_hosts("node1:2,node2:2"), 4))
    env = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.231.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
           "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "eth0"}
    try:
        proc = run(["srun", "--mpi=none", "-w", "node1,node2", "--ntasks-per-node=2", sys.executable, "-c",
                    GLOO_RANK], env=env, timeout=300, check=True)
    finally:
        server.stop()
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [(r["rank"], r["host"]) for r in ranks] == [(0, "node1"), (1, "node1"), (2, "node2"), (3, "node2")]
    assert all(r["size"] == 4 and r["cross_size"] == 2 and r["gloo"] for r in ranks)
    assert all(r["sum"] == [10.0] for r in ranks)


def test_a_ranks_heartbeat_address_is_the_one_other_nodes_reach_it_at(cluster_net):
    """This machine's hostname resolves to 127.0.0.1 (as Debian's /etc/hosts maps a node's to
    127.0.1.1): a stall watch announcing that was never heard from the other nodes, and named
    live ranks as stalled. It announces the source address of its route to another rank's node:
    this machine's on the rehearsal's bridge; with every rank on its own host, that host's."""
    from chexnet_hvd import stall

    me = socket.gethostname()
    assert stall.own_address([me, "node1", "node2"], me) == "10.231.0.1"
    assert stall.own_address([me, me], me) == socket.gethostbyname(me)
