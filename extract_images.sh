#!/usr/bin/env bash
# Extract the downloaded NIH tarballs in DIR into DIR/images (idempotent, refuses unsafe entries).
#   ./extract_images.sh data/nih
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-$here/.venv/bin/python}" -m chexnet_hvd.download --out "${1:?usage: extract_images.sh DIR}" --extract-only "${@:2}"
