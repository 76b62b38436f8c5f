"""CLI commands of the stamps area, registered on the groups of `worker.cli`."""

from __future__ import annotations
