"""chexnet_hvd: chest X-ray classifiers trained with Horovod or TensorFlow's own collectives, from
the metadata CSV to scaling tables."""

import importlib.util
import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) drown the progress output; warnings stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# The suite is written for Keras 2. TensorFlow >= 2.16 ships Keras 3 as tf.keras unless this is
# set, with tf_keras (Keras 2) installed: the TF 2.21 lane installs it. On TF 2.15 tf.keras is
# Keras 2 already, and the variable would make it look for tf_keras, so it is set only beside it.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
else:  # e.g. inherited from a TF 2.21 shell by a job that runs the 2.15 lane
    os.environ.pop("TF_USE_LEGACY_KERAS", None)

__version__ = "0.1.0"
