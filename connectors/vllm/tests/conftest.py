"""Fixtures: kvtier's Python test kit (python/tests/kvtier_testkit.py), the
real kvtierd included."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "python" / "tests"))

from kvtier_testkit import Daemon, kvtierd, namespace  # noqa: E402, F401
