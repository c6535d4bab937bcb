"""The trainer's watch over its ranks: the input feed's counters (batches produced, taken, and
taken after waiting), the compute probe of the bottleneck verdict (chexnet_hvd.bottleneck), and
the stall watchdog (chexnet_hvd.stall) wired to the run log."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import tensorflow as tf

from chexnet_hvd import cli, data, runlog, stall


class Feed:
    """Counts, in the input pipeline's own graph (no Python per batch), the batches this rank's
    pipeline produced and the model took, and the steps at which nothing else was ready when
    the model took its batch (it had waited for its input): the stall watchdog reads the first,
    the bottleneck verdict the last."""

    def __init__(self):
        self.produced, self.taken, self.starved = (tf.Variable(0, dtype=tf.int64, trainable=False)
                                                   for _ in range(3))

    def counted(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """`ds` with a buffer of its own whose level the counters see."""

        @data.plain
        def produce(x, y):
            with tf.control_dependencies([self.produced.assign_add(1)]):
                return tf.identity(x), y

        @data.plain
        def take(x, y):
            taken = self.taken.assign_add(1)
            empty = tf.cast(tf.equal(self.produced.read_value(), taken), tf.int64)
            with tf.control_dependencies([self.starved.assign_add(empty)]):
                return tf.identity(x), y

        return ds.map(produce).prefetch(2).map(take)

    def counts(self) -> tuple[int, int]:
        """(batches taken, of which the model had waited for) so far."""
        return int(self.taken.numpy()), int(self.starved.numpy())


def compute_probe(engine, trained, loss, x: tf.Tensor, y: tf.Tensor):
    """A function timing nothing itself: forward and backward passes of `trained` on one batch
    (x, y) held in memory, on this rank alone (no input, no collective, no weight update)."""

    @data.plain
    def passes():
        with tf.GradientTape() as tape:
            value = loss(y, trained(x, training=False))  # training=False: batch-norm stats untouched
        grads = [g for g in tape.gradient(value, trained.trainable_variables) if g is not None]
        return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

    return engine.local_function(passes)


class StallWatch:
    """The stall watchdog of this rank (chexnet_hvd.stall), wired to the trainer: progress from
    every step, validation batch and checkpoint write; input batches counted as they are
    handed to the model; the run log's end record when the job stalls."""

    def __init__(self, timeout: float, engine, ranks: list[dict], run_dir: Path, feed: Feed):
        self.hosts, self.engine = [r["host"] for r in ranks], engine
        self.run_dir, self.writer = run_dir, None  # the chief's run log, once open
        self.watchdog = stall.watch(engine, self.hosts, timeout, self.on_stall, lambda: feed.counts()[0])

    def on_stall(self, message: str, names: list[int]) -> None:
        if not names:
            return
        if self.writer is None:  # the chief is silent to this rank; unless it wrote the end
            # after all (a cut link: each side hears nothing from the other), this rank writes it
            try:
                if runlog.status(self.run_dir) == "stalled":
                    return
            except runlog.RunLogError:
                pass
        self.log_stalled(message, names)

    def log_stalled(self, message: str, names: list[int], **fields) -> None:
        """The run log's end record, status stalled, naming the ranks `names` and their hosts."""
        (self.writer or runlog.RunLogWriter(self.run_dir)).write(
            "end", status="stalled", error=message, ranks=names, hosts=sorted({self.hosts[r] for r in names}),
            **fields)

    def suspended_too_long(self, message: str, seconds: float) -> None:
        """The chief's end record when the engine gave up during a suspension (no rank to name;
        not a stall the Slurm templates count against the job: chexnet_hvd.runlog)."""
        self.watchdog.stop()  # the attempt ends here: the watch must not add a stall of its own
        with contextlib.suppress(OSError):  # a full disk: the printed line is the news
            fields = {"before_start": True} if self.writer is None else {}  # no start record yet
            self.log_stalled(message, [], suspended=round(seconds), **fields)

    def beat(self, step: int | None = None, steps: int = 1, phase: str | None = None) -> None:
        self.watchdog.progress(step, steps, phase)

    def rest(self) -> None:
        self.watchdog.rest()

    def failed_collective(self, err: BaseException) -> str | None:
        """The one line that says why a collective failed, when it is a stall: peers went
        silent (a timeout of the engine's own, or its coordination service noticing): it names
        them; or the engine gave up on its peers just after the job was suspended (its own
        timeout ran out meanwhile): it says so. The run log's end record, status stalled (the
        Slurm templates requeue it), is written by the lowest rank still heard."""
        if isinstance(err, cli.InputError | KeyboardInterrupt):
            return None
        self.watchdog.read_queued()  # beats that arrived but were not read: a live peer is not silent
        silent = self.watchdog.silent_peers(2 * self.watchdog.interval)
        if silent:
            where = ", ".join(f"rank {r} ({self.hosts[r]})" for r in silent)
            message = (f"stalled: a collective failed ({type(err).__name__}: {cli.error_text(err)}); "
                       f"no heartbeat from {where} for {2 * self.watchdog.interval:g} s or more")
            live = [r for r in range(len(self.hosts)) if r not in silent]
            logger = live[0] if live else None  # as in stall.Watchdog
        elif self.engine.peer_left(err) and (seconds := self.watchdog.just_suspended()) is not None:
            message = (f"stalled: a collective failed ({type(err).__name__}: {cli.error_text(err)}) after the "
                       f"job was suspended for {seconds:.0f} s, longer than the engine's own timeout "
                       f"(--stall-timeout plus {stall.ENGINE_MARGIN} s or more); the attempt ends at its last checkpoint")
            logger = 0
        else:
            return None
        if logger != self.watchdog.rank:  # beating on
            time.sleep(5)  # let that rank write it before the launcher ends the job
        elif silent:
            self.on_stall(message, silent)
        else:
            self.suspended_too_long(message, seconds)
        return message
