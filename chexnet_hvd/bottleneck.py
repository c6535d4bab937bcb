"""Why a run does not scale: a verdict per epoch, from what every rank measures cheaply.

- the step: the epoch's timed seconds per step (the ranks step together, so one number);
- compute, per rank: a probe after the epoch, forward and backward passes of the model on a
  batch held in memory for a quarter of a second or more, with no input pipeline and no
  collective (the median of three windows' time per pass: a moment's contention slows one);
- input, per rank: the fraction of the epoch's steps at which its input buffer was empty when
  the model asked for the next batch (it then waited for its input pipeline).

What the step spends beyond the slowest rank's compute is communication, or waiting for a
slower rank. The verdict, first match: `straggler (rank N)` when one rank's compute is well above
the others' and their wait for it is a tenth of the step or more, `input-bound` when a rank's
input was empty at most steps, `network-bound` when communication takes most of the step, else
`compute-bound`. The optimizer's update is left out of the compute probe (it would change the
weights), so communication is slightly overstated. Pure functions: no TensorFlow (the scaling
report uses them too).
"""

from __future__ import annotations

import statistics

STRAGGLER = 1.3  # a rank whose compute is this many times the others' median holds them,
WAIT = 0.1  # when their wait for it (its compute beyond their median) is this part of a step
STARVED = 0.5  # input-bound: a rank's input buffer empty at more than this fraction of its steps
NETWORK = 0.5  # network-bound: communication (or waiting) more than this fraction of a step


def verdict(step_seconds: float, compute_seconds: list[float], input_starved: list[float]) -> dict:
    """The epoch's verdict and the numbers behind it (JSON-ready), from the step time and the
    ranks' compute probes and input-starved fractions (in rank order)."""
    slowest = max(range(len(compute_seconds)), key=compute_seconds.__getitem__)
    others, most = compute_seconds[:slowest] + compute_seconds[slowest + 1:], compute_seconds[slowest]
    communication = max(0.0, step_seconds - most) if others else 0.0
    median = statistics.median(others) if others else most  # one rank: nobody waits for it
    if most > STRAGGLER * median and most - median >= WAIT * step_seconds:
        found = f"straggler (rank {slowest})"
    elif max(input_starved) > STARVED:
        found = "input-bound"
    elif communication > NETWORK * step_seconds:
        found = "network-bound"
    else:
        found = "compute-bound"
    return {"bottleneck": found, "step_seconds": round(step_seconds, 6),
            "compute_seconds": [round(c, 6) for c in compute_seconds],
            "communication_seconds": round(communication, 6),
            "input_starved": [round(s, 3) for s in input_starved]}


def summary(record: dict) -> str:
    """An epoch record's verdict in a few words, with its numbers: what the scaling report and
    the trainer's epoch line show."""
    if "bottleneck" not in record:
        return "-"
    step, compute = record["step_seconds"], max(record["compute_seconds"])
    return (f"{record['bottleneck']}: step {step * 1e3:.1f} ms, compute {compute * 1e3:.1f} ms, "
            f"communication {record['communication_seconds'] * 1e3:.1f} ms, "
            f"input empty at {max(record['input_starved']):.0%} of steps")
