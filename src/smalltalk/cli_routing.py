"""CLI commands of the routing stages (routers train, partition) and the whole-pipeline `run`."""

from __future__ import annotations

import argparse


def add_commands(sub, common) -> None:
    """Filled in by the routing stage."""
    del sub, common
