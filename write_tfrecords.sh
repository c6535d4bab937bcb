#!/usr/bin/env bash
# Images + metadata CSV -> sharded TFRecords + manifest.json. Arguments pass through to
# `python -m chexnet_hvd.records` (see --help), e.g.
#   ./write_tfrecords.sh --csv data/nih/Data_Entry_2017.csv --images data/nih/images --out data/records
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-$here/.venv/bin/python}" -m chexnet_hvd.records "$@"
