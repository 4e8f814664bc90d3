#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: unit tests, lint,
# and the end-to-end tests on throwaway systemd nodes. Needs root.
# Extra arguments go to pytest, for example: scripts/test.sh -k config
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# MLflow in the tests would otherwise fetch a remote telemetry config.
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python -m pytest "$@"
