"""The Dynamo tests share kvtier's Python test kit (python/tests)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "python" / "tests"))
