"""The communication cost model behind `tools/scaling_report.py --project` and bench/bench_comm.py:
ring allreduce time (Patarasuk & Yuan 2009, the algorithm of Horovod, NCCL and the tf engine),
flat or hierarchical over a fabric, the step time it gives with compute, weak- and
strong-scaling projections to many ranks, and the fit of its bandwidth and latency terms to
measured allreduce times. Pure functions; no TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass

from chexnet_hvd import cli
from chexnet_hvd.scaling import NIH_TRAIN_IMAGES, duration, fmt


@dataclass
class Network:
    """The fabric, as allreduce cost parameters. Defaults: 100 Gb/s EDR InfiniBand between nodes,
    the interconnect of the reference GPU clusters (12.5 GB/s per direction per node); 10 us per
    ring step, the order of an NCCL/MPI message latency over InfiniBand; one GPU per node (every
    rank on the network); no overlap of communication with the backward pass (an upper bound on
    its cost; Horovod's tensor fusion overlaps some of it in practice). With several GPUs per node
    the ranks within a node talk over `intra_bandwidth_gbs` (default: NVLink 2 on a V100 node,
    about 150 GB/s per GPU per direction) and the allreduce is hierarchical (NCCL's and Horovod's
    HOROVOD_HIERARCHICAL_ALLREDUCE) unless `hierarchical` is False (one flat ring over all ranks,
    as Open MPI's and Gloo's CPU allreduce and the tf engine's ring)."""

    bandwidth_gbs: float = 12.5
    latency_us: float = 10.0
    overlap: float = 0.0
    gpus_per_node: int = 1
    intra_bandwidth_gbs: float = 150.0
    intra_latency_us: float = 5.0
    hierarchical: bool = True


def ring_seconds(grad_bytes: float, ranks: int, bandwidth_gbs: float, latency_us: float) -> float:
    """Ring allreduce of `grad_bytes` on `ranks` ranks over links of `bandwidth_gbs` (Patarasuk &
    Yuan 2009; the algorithm of Horovod and NCCL): 2 (N-1) steps, each moving grad_bytes / N per
    rank, so 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency. Zero on one rank."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * grad_bytes / (bandwidth_gbs * 1e9) + steps * latency_us * 1e-6


def nodes_of(ranks: int, net: Network) -> tuple[int, int]:
    """(nodes, ranks per node) of `ranks` ranks placed in blocks of `net.gpus_per_node`."""
    local = max(1, min(ranks, net.gpus_per_node))
    return -(-ranks // local), local


def allreduce_seconds(grad_bytes: float, ranks: int, net: Network) -> float:
    """One allreduce of `grad_bytes` on `ranks` ranks of `net`. Within one node: a ring over the
    intra-node links. Hierarchical (NCCL, Horovod's hierarchical allreduce): a reduce-scatter and
    an allgather within each node (together one intra-node ring's cost) and between them a ring
    across the nodes, its local-size parallel rings of bytes / local sharing the node's link (one
    ring of all bytes at the node's bandwidth). Flat: one ring over every rank in block order,
    each of its 2 (N-1) steps paced by the hop that crosses a node boundary."""
    nodes, local = nodes_of(ranks, net)
    intra = ring_seconds(grad_bytes, local, net.intra_bandwidth_gbs, net.intra_latency_us)
    if nodes == 1:
        return intra
    if net.hierarchical:
        return intra + ring_seconds(grad_bytes, nodes, net.bandwidth_gbs, net.latency_us)
    return ring_seconds(grad_bytes, ranks, min(net.bandwidth_gbs, net.intra_bandwidth_gbs),
                        max(net.latency_us, net.intra_latency_us))


def step_seconds(compute_seconds: float, grad_bytes: float, ranks: int, net: Network,
                 backward_passes: int = 1) -> float:
    """A training step on `ranks` ranks: the compute, and the part of the allreduce not hidden
    behind the backward pass; accumulating `backward_passes` batches per update allreduces once
    every that many steps."""
    return compute_seconds + (1 - net.overlap) * allreduce_seconds(grad_bytes, ranks, net) / backward_passes


def project(step_seconds_1: float, grad_bytes: float, local_batch: int, ranks: list[int],
            net: Network, backward_passes: int = 1, global_batch: int = 0,
            epoch_images: int = NIH_TRAIN_IMAGES) -> list[dict]:
    """Weak scaling from a single-rank step time: every rank computes as fast as one alone
    (`local_batch` images per rank), and the allreduce adds to each step. With `global_batch`,
    also strong scaling: that batch split over the ranks, compute taken as proportional to the
    per-rank batch (an optimistic assumption on GPUs, which run small batches below their peak).
    Epoch seconds: `epoch_images` at the weak-scaling rate."""
    rows = []
    for n in ranks:
        comm = allreduce_seconds(grad_bytes, n, net)
        step = step_seconds(step_seconds_1, grad_bytes, n, net, backward_passes)
        ips = n * local_batch / step
        row = {"ranks": n, "nodes": nodes_of(n, net)[0], "step_seconds": step, "allreduce_seconds": comm,
               "images_per_sec": ips, "speedup": n * step_seconds_1 / step,
               "efficiency": step_seconds_1 / step, "epoch_seconds": epoch_images / ips}
        if global_batch:
            compute = step_seconds_1 * global_batch / (n * local_batch)
            strong = step_seconds(compute, grad_bytes, n, net, backward_passes)
            single = step_seconds_1 * global_batch / local_batch
            row |= {"strong_step_seconds": strong, "strong_speedup": single / strong,
                    "strong_efficiency": single / strong / n}
        rows.append(row)
    return rows


def projection_markdown(rows: list[dict]) -> str:
    """The projection as a Markdown table; strong-scaling columns when `project` made them."""
    strong = "strong_speedup" in rows[0]
    head = ["ranks", "nodes", "step s", "allreduce s", "img/s", "speedup", "efficiency", "epoch"]
    if strong:
        head += ["strong: step s", "strong: speedup", "strong: efficiency"]
    body = []
    for r in rows:
        cells = [r["ranks"], r["nodes"], f"{r['step_seconds']:.4f}", f"{r['allreduce_seconds']:.4f}",
                 fmt(r["images_per_sec"]), fmt(r["speedup"], 2), f"{r['efficiency'] * 100:.1f}%",
                 duration(r["epoch_seconds"])]
        if strong:
            cells += [f"{r['strong_step_seconds']:.4f}", fmt(r["strong_speedup"], 2),
                      f"{r['strong_efficiency'] * 100:.1f}%"]
        body.append(cells)
    return cli.markdown_table(head, body)


def fit_ring(samples: list[tuple[float, int, float]]) -> tuple[float, float]:
    """(bandwidth GB/s, latency us) of the ring model fitted to measured allreduces, given as
    (bytes, ranks, seconds): least squares of seconds = 2 (N-1)/N * bytes / bandwidth +
    2 (N-1) * latency on the relative error (each sample divided by its seconds), so that small
    messages, which carry the latency, weigh as much as large ones."""
    rows = [(2 * (n - 1) / n * size / t, 2 * (n - 1) / t) for size, n, t in samples if n > 1]
    if len(rows) < 2:
        raise ValueError("fit_ring: needs at least two samples of more than one rank")
    # normal equations of [x, z] @ [1/bandwidth, latency] = 1
    sxx = sum(x * x for x, _ in rows)
    sxz = sum(x * z for x, z in rows)
    szz = sum(z * z for _, z in rows)
    sx, sz = sum(x for x, _ in rows), sum(z for _, z in rows)
    det = sxx * szz - sxz * sxz
    inverse_bw = (sx * szz - sz * sxz) / det
    latency = (sz * sxx - sx * sxz) / det
    return 1 / inverse_bw / 1e9, latency * 1e6
