"""Shared test set-up: ``tests/`` on the path so every test can import ``dynamics``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
