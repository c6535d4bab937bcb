"""One rank of the fp16 overflow test (tests/test_train_flags.py runs it on 2 ranks of each engine:
`overflow_worker.py OUT ENGINE [CALLS,...]`: one training per CALLS, its steps per call of Keras'
train function, each from the same initial weights, in one launch: a launch costs more than them).

The trainer's own optimizer (`train.make_optimizer`, mixed_float16) trains a small model with
Keras `fit`; on step OVERFLOW_STEP only rank 1's batch holds an infinite pixel, so only its local
gradients are non-finite. After every step each rank records its loss scale, its optimizer step
and a hash of its weights into OUT/rank<R>-<steps per call>.json, one file per setting (at several
steps per call: after every call).
"""

import hashlib
import json
import sys

import numpy as np

from chexnet_hvd import config, distributed, models, train

OVERFLOW_STEP, STEPS = 3, 6


def weights_hash(model) -> str:
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def main(out: str, engine_name: str, calls: str = "1") -> None:
    # the engines' timeouts of a watched job (as the trainer's default): above a loaded machine's pauses
    engine, _ = distributed.start(engine_name, threads=1, stall_timeout=600)
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    for steps_per_call in map(int, calls.split(",")):
        with open(f"{out}/rank{engine.rank}-{steps_per_call}.json", "w") as fh:
            json.dump(train_and_log(engine, steps_per_call), fh)


def train_and_log(engine, steps_per_call: int) -> list[dict]:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    cfg = config.TrainConfig(data="-", run_dir="-", model="small_cnn", image_size=16, batch_size=4,
                             precision="mixed_float16", reference_batch=0)  # lr 1e-3, no warmup
    derived = config.derive(cfg, {"splits": {"train": {"count": STEPS * 4 * engine.size}}}, engine.size)
    with engine.scope():
        model = models.build_model("small_cnn", 16, 3)
        model.compile(optimizer=train.make_optimizer(cfg, engine, derived), loss=train.make_loss(),
                      steps_per_execution=steps_per_call)

    rng = np.random.default_rng(engine.rank)
    images = rng.normal(size=(STEPS, 4, 16, 16, 3)).astype(np.float32)
    if engine.rank == 1:
        images[OVERFLOW_STEP - 1, 0, 5, 5, 0] = np.inf  # only this rank, only this step
    labels = np.concatenate([rng.integers(0, 2, (STEPS, 4, 3)), np.ones((STEPS, 4, 3))], axis=-1)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)))

    def scale() -> float:
        return float(tf.keras.backend.get_value(model.optimizer.loss_scale))

    log = [{"step": 0, "scale": scale(), "weights": weights_hash(model)}]

    class Record(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            log.append({"step": batch + 1, "scale": scale(),
                        "iterations": int(model.optimizer.iterations.numpy()),
                        "weights": weights_hash(model)})

    model.optimizer.build(model.trainable_variables)
    engine.broadcast_variables(model.variables)
    model.fit(engine.fit_input(lambda: dataset), epochs=1, steps_per_epoch=STEPS,
              callbacks=[Record()], verbose=0)
    return log


if __name__ == "__main__":
    main(*sys.argv[1:])
