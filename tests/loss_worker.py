"""The trainer's loss against `metrics.masked_bce`, in one process of an engine (tests/
test_models_precision.py runs it under each: `loss_worker.py OUT ENGINE`).

For 1, 2, 14 and 21 classes, with and without masked entries, in fp32 and mixed_float16: a
small model built and compiled as the trainer builds it (its loss, its optimizer at lr 0, in the
engine's scope), one batch of packed targets; the loss Keras trains the batch on (what
`train_on_batch` reports; lr 0 leaves the weights as they were) next to `masked_bce` of the
same predictions (the model's output, which carries its logits, and its probabilities alone,
as validation has them), into OUT as JSON. With `saturated`, the output layer set so that
every logit is -30 for labels all positive: the loss from the logits is 30, from the
probabilities (clipped to 1e-7) 16.1.
"""

import json
import sys

import numpy as np

from chexnet_hvd import config, distributed, metrics, models, train


def main(out: str, engine_name: str) -> None:
    # the engines' timeouts of a watched job (as the trainer's default): above a loaded machine's pauses
    engine, _ = distributed.start(engine_name, threads=1, stall_timeout=600)
    import tensorflow as tf

    results = []
    for precision in ("fp32", "mixed_float16"):
        tf.keras.mixed_precision.set_global_policy("float32" if precision == "fp32" else precision)
        for classes in (1, 2, 14, 21):
            for masked in (False, True):
                cfg = config.TrainConfig(data="-", run_dir="-", model="small_cnn", image_size=16,
                                         batch_size=6, lr=0.0, precision=precision, engine=engine_name)
                derived = config.derive(cfg, {"splits": {"train": {"count": 60}}}, engine.size)
                rng = np.random.default_rng(classes * 2 + masked)
                x = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)
                label = rng.integers(0, 2, (6, classes)).astype(np.float32)
                mask = (rng.random((6, classes)) < 0.6 if masked else np.ones((6, classes))).astype(np.float32)
                mask[0, 0] = 1.0  # at least one entry counts
                with engine.scope():
                    model = models.build_model("small_cnn", 16, classes)
                    model.compile(optimizer=train.make_optimizer(cfg, engine, derived), loss=train.make_loss())
                for saturated in (False, True) if classes == 2 and not masked else (False,):
                    if saturated:
                        head = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)][-1]
                        head.set_weights([np.zeros_like(w) - 30 * (w.ndim == 1) for w in head.get_weights()])
                        label = np.ones_like(label)
                    y = train.pack_targets(label, mask)
                    prob = model(x, training=False)
                    expected = float(metrics.masked_bce(label, prob, mask))  # Keras' output: with its logits
                    of_probabilities = float(metrics.masked_bce(label, np.asarray(prob), mask))  # validation's
                    trained = float(model.train_on_batch(x, y))
                    results.append({"precision": precision, "classes": classes, "masked": masked,
                                    "saturated": saturated, "masked_bce": expected,
                                    "of_probabilities": of_probabilities, "train_on_batch": trained})
    with open(out, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
