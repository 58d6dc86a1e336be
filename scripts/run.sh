#!/usr/bin/env bash
# Install the node and run it on its embedded default (SQLite and files under var/).
# Usage: bash scripts/run.sh [dicom-node run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ./sdk -e .
exec dicom-node run "$@"
