"""Errors raised by store operations; the edges turn them into HTTP statuses / exit codes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class StoreError(Exception):
    """Base class of every error a store operation raises on purpose."""


class ValidationFailed(StoreError):
    """Input breaks a rule. `errors` maps a field name (or `base`) to messages."""

    def __init__(self, errors: Mapping[str, Sequence[str]]) -> None:
        self.errors: dict[str, list[str]] = {k: list(v) for k, v in errors.items()}
        super().__init__("; ".join(f"{k} {', '.join(v)}" for k, v in self.errors.items()))

    @classmethod
    def single(cls, field: str, message: str) -> ValidationFailed:
        return cls({field: [message]})


class NotFound(StoreError):
    """A record does not exist in this store (or belongs to another one)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} not found")


class ErrorBag:
    """Collects field errors so one response names every problem at once."""

    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def add(self, field: str, message: str) -> None:
        self.errors.setdefault(field, []).append(message)

    def __bool__(self) -> bool:
        return bool(self.errors)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationFailed(self.errors)
