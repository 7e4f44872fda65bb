"""Fixtures: the shared ones live in kvtier_testkit (the connectors' tests
use them too); re-exported here for ``from conftest import ...``."""

from kvtier_testkit import Daemon, kvtierd, namespace  # noqa: F401
