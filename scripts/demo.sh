#!/usr/bin/env bash
# Set up (idempotent) and run the demo on the local namespace testbed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/testbed demo "$@"
