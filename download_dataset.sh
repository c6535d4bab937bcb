#!/usr/bin/env bash
# Download NIH ChestX-ray14 (12 image tarballs; metadata too from a mirror). Arguments pass
# through to `python -m chexnet_hvd.download` (see --help), e.g.
#   ./download_dataset.sh --out data/nih --jobs 4 --extract
#   CHEXNET_NIH_BASE_URL=https://mirror.example.org/nih ./download_dataset.sh --out data/nih
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-$here/.venv/bin/python}" -m chexnet_hvd.download "$@"
