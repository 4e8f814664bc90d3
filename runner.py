#!/usr/bin/env python3
"""Entry point: `python runner.py apply|teardown|validate --help`."""

import sys

from mlflow_replay.cli import main

if __name__ == "__main__":
    sys.exit(main())
