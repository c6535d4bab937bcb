"""chexnet_hvd: chest X-ray classifiers trained with Horovod, from the metadata CSV to scaling tables."""

import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) drown the progress output; warnings stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
