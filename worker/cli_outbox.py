"""CLI commands of the outbox area, registered on the groups of `worker.cli`."""

from __future__ import annotations
