"""Normalisation and validation of customer fields.

Pure functions, shared by the REST API and the sync connectors' upsert path, so that a phone or
email means the same thing whichever way it arrived.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

METADATA_MAX_BYTES = 16 * 1024
SOURCE_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
EXTERNAL_ID_MAX = 255
NAME_MAX = 200
METADATA_MAX_DEPTH = 32


class FieldError(ValueError):
    """A value is invalid; the message is meant for the API client."""


def _validated_email(candidate: str) -> str:
    """The full check (email-validator): the reference for every address."""
    if len(candidate) > 320:
        raise FieldError("is too long (maximum is 320 characters)")
    try:
        result = validate_email(candidate, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        raise FieldError(f"is invalid ({exc})") from None
    return result.normalized.lower()


# An ASCII dot-atom local part (RFC 5322 atext, no leading/trailing/double dots): the shape of
# nearly every address a shop holds, and one email-validator accepts unchanged.
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


@functools.lru_cache(maxsize=4096)
def _validated_domain(domain: str) -> str | None:
    """The normalised domain, or None when email-validator rejects it (then the slow path
    reports why). Domains repeat across customers, so this is checked once per domain."""
    try:
        return _validated_email(f"a@{domain}").partition("@")[2]
    except FieldError:
        return None


def normalise_email(raw: str) -> str:
    """Validate an address and return it lower-cased (emails are unique case-insensitively).

    Plain ASCII local parts take a fast path (the domain validated once per domain); anything
    else goes through email-validator in full. Both give the same answer (a property test
    holds them to it); the fast path is what lets a sync normalise 100k addresses in a second.
    """
    candidate = raw.strip()
    local, at, domain = candidate.rpartition("@")
    if at and len(local) <= 64 and len(candidate) <= 254 and _PLAIN_LOCAL.fullmatch(local):
        checked = _validated_domain(domain)
        if checked is not None and len(local) + 1 + len(checked) <= 254:
            return f"{local}@{checked}".lower()
    return _validated_email(candidate)


def normalise_phone(raw: str, region: str) -> str:
    """Parse a phone number (national numbers read in `region`) and return it in E.164."""
    candidate = raw.strip()
    if len(candidate) > 40:
        raise FieldError("is too long")
    try:
        parsed = phonenumbers.parse(candidate, region.upper() or None)
    except phonenumbers.NumberParseException:
        raise FieldError("is not a phone number") from None
    if not phonenumbers.is_valid_number(parsed):
        raise FieldError("is not a valid phone number")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


_FULL_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_YEARLESS = re.compile(r"^--(\d{2})-(\d{2})$")


@dataclass(frozen=True, slots=True)
class Birthday:
    """A birthday whose year may be unknown (Square `0000-MM-DD`, Appy Stamp `dd-mm`)."""

    month: int
    day: int
    year: int | None = None

    def isoformat(self) -> str:
        if self.year is None:
            return f"--{self.month:02d}-{self.day:02d}"
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"


def parse_birthday(raw: str, *, today: dt.date | None = None) -> Birthday:
    """Accept `YYYY-MM-DD`, year-less `--MM-DD` and Square's `0000-MM-DD`.

    Impossible dates (`2023-02-29`, `--02-30`) are rejected.
    """
    value = raw.strip()
    year: int | None
    if m := _FULL_DATE.match(value):
        year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if year == 0:
            year = None
    elif m := _YEARLESS.match(value):
        year, month, day = None, int(m.group(1)), int(m.group(2))
    else:
        raise FieldError("must be YYYY-MM-DD or --MM-DD")
    try:
        # A year-less date is checked in a leap year so that --02-29 is allowed.
        date = dt.date(year if year is not None else 2000, month, day)
    except ValueError:
        raise FieldError("is not a valid date") from None
    if year is not None:
        reference = today or dt.datetime.now(dt.UTC).date()
        if year < 1900:
            raise FieldError("is too far in the past")
        if date > reference + dt.timedelta(days=1):  # +1 day: the customer may be ahead of UTC
            raise FieldError("can't be in the future")
    return Birthday(month=month, day=day, year=year)


def check_text(value: str) -> str:
    """Text both databases can store: PostgreSQL rejects NUL, and lone surrogates are no UTF-8."""
    if "\x00" in value:
        raise FieldError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError("must be valid Unicode text") from None
    return value


def check_metadata(value: Any, *, field: str = "metadata") -> dict[str, Any]:
    """A metadata patch must be a JSON object the databases can store and we can render back.

    Walked iteratively (no recursion limit to hit): strings and keys go through `check_text`,
    numbers must be finite (JSON has no NaN/Infinity), nesting is capped.
    """
    if not isinstance(value, Mapping):
        raise FieldError("must be a JSON object")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: list[Any] = list(item.values())
            for key in item:
                if not isinstance(key, str):
                    raise FieldError("keys must be strings")
                check_text(key)
        elif isinstance(item, list | tuple):
            children = list(item)
        else:
            if isinstance(item, str):
                check_text(item)
            elif isinstance(item, float) and not math.isfinite(item):
                raise FieldError("must not contain NaN or Infinity")
            continue
        if children and depth >= METADATA_MAX_DEPTH:
            raise FieldError(f"is nested too deeply (maximum depth is {METADATA_MAX_DEPTH})")
        stack.extend((child, depth + 1) for child in children)
    return dict(value)


def merge_metadata(existing: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow merge: keys in `patch` replace existing ones; a key set to null is removed."""
    merged = dict(existing or {})
    for key, val in patch.items():
        if val is None:
            merged.pop(key, None)
        else:
            merged[key] = val
    size = len(json.dumps(merged, separators=(",", ":"), ensure_ascii=False).encode())
    if size > METADATA_MAX_BYTES:
        raise FieldError(f"is too large ({size} bytes; the maximum is {METADATA_MAX_BYTES})")
    return merged


def check_source(value: Any) -> str:
    # fullmatch: `$` alone would also accept a trailing newline ("shopify\n").
    if not isinstance(value, str) or not SOURCE_SLUG.fullmatch(value):
        raise FieldError(
            "source must be a lowercase slug (a letter, then up to 31 letters, digits or _)"
        )
    return value


def check_external_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(
            value
        )  # Shopify/Square ids are often numeric; they are identifiers, not numbers.
    if not isinstance(value, str) or not value.strip():
        raise FieldError("external_id must be a non-empty string")
    if len(value) > EXTERNAL_ID_MAX:
        raise FieldError(f"external_id is too long (maximum is {EXTERNAL_ID_MAX} characters)")
    try:
        check_text(value)
    except FieldError as exc:
        raise FieldError(f"external_id {exc}") from None
    return value.strip()


def phone_digits(phone: str | None) -> str:
    return re.sub(r"\D", "", phone or "")


def build_search_text(
    first_name: str | None, last_name: str | None, email: str | None, phone: str | None
) -> str:
    """The lower-cased text `search` matches by substring: full name, email, phone digits."""
    name = " ".join(p for p in (first_name, last_name) if p)
    return "\n".join((name.lower(), (email or "").lower(), phone_digits(phone)))
