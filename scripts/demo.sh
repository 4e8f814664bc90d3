#!/usr/bin/env bash
# Set up (scripts/setup.sh) and replay a small sample store, logged by a real
# MLflow server and published to a local S3 server, onto this machine when it
# runs systemd, or onto a throwaway local systemd node otherwise. Needs root.
#   scripts/demo.sh        start the demo and print the viewer's URL
#   scripts/demo.sh down   tear the replay down and stop the demo's servers
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m testbench.demo "${1:-up}"
