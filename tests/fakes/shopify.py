"""A fake Shopify GraphQL Admin API that behaves: it really paginates `customers(...)` sorted by
(updatedAt, id) with opaque cursors, honours the `updated_at:` search filter, enforces the
calculated-cost leaky bucket (answering THROTTLED with HTTP 200, or 429 when asked) and reports
`extensions.cost` on every answer, checks the access token, and fails on demand.

In process: `httpx.Client(transport=httpx.MockTransport(fake.handle), base_url="https://fake")`.
Over real HTTP: `with fake.serve() as base_url: ...` (127.0.0.1, free port).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as dt
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from tests.fakes.server import serve as serve_http

TOKEN = "shpat_fake_token"
API_VERSION = "2025-07"
EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

_FILTER = re.compile(r"updated_at:(>=|<=|>|<)\s*'?([^'\s]+)'?")
_PATH = re.compile(r"^/admin/api/([^/]+)/graphql\.json$")


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it; records every sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        # Like a real clock, it always moves a little: a 1e-15 s wait (float rounding in a
        # budget) must not leave a sleeper spinning at the same instant forever.
        self.now += max(1e-9, seconds)


def _instant(value: str) -> dt.datetime:
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(value)
    return parsed.astimezone(dt.UTC)


def _gql_error(message: str, code: str, *, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, json={"errors": [{"message": message, "extensions": {"code": code}}]}
    )


class FakeShopify:
    """State: customers (GraphQL `Customer` nodes) keyed by numeric id, with update instants."""

    def __init__(
        self,
        *,
        customers: Iterable[Mapping[str, Any]] = (),
        bucket_max: float = 2000.0,
        restore_rate: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        access_token: str = TOKEN,
        api_version: str = API_VERSION,
        node_cost: int = 3,
        throttle_status: int = 200,
        utc_offset: dt.timedelta = dt.timedelta(0),
        timeout_sleep: float = 1.0,
    ) -> None:
        self._lock = threading.RLock()
        self._nodes: dict[int, dict[str, Any]] = {}
        self._updated: dict[int, dt.datetime] = {}
        self._order: list[tuple[dt.datetime, int]] | None = None
        self._next_id = 1000
        self._latest = EPOCH
        self.bucket_max = bucket_max
        self.restore_rate = restore_rate
        self._clock = clock
        self._available = bucket_max
        self._last_leak = clock()
        self._rng = random.Random(seed)
        self.access_token = access_token
        self.api_version = api_version
        self.node_cost = node_cost
        self.throttle_status = throttle_status
        self.utc_offset = dt.timezone(utc_offset)
        self.timeout_sleep = timeout_sleep
        self.fault_rate = 0.0
        self.repeat_cursor = False  # pagination-loop injection: every page says "after <first>"
        self._fail_next: list[int] = []
        self._timeout_next = 0
        self.requests = 0
        self.throttled_answers = 0
        self.faults = 0
        self.variables_seen: list[dict[str, Any]] = []
        # Metafields by (ownerId, namespace, key) → {"type", "value"}; `metafield_writes` counts
        # metafieldsSet inputs that changed a value (an identical set changes nothing).
        self.metafields: dict[tuple[str, str, str], dict[str, str]] = {}
        self.metafield_writes = 0
        self.metafield_requests = 0
        for customer in customers:
            self.add_customer(**customer)

    # --- state ---------------------------------------------------------------------------

    def _render(self, when: dt.datetime) -> str:
        local = when.astimezone(self.utc_offset)
        if self.utc_offset.utcoffset(None) == dt.timedelta(0):
            return local.strftime("%Y-%m-%dT%H:%M:%SZ")
        return local.isoformat(timespec="seconds")

    def _put(self, node: dict[str, Any], updated: dt.datetime, rendered: str | None = None) -> None:
        numeric = int(node["legacyResourceId"])
        node["updatedAt"] = rendered or self._render(updated)
        self._nodes[numeric] = node
        self._updated[numeric] = updated
        self._latest = max(self._latest, updated)
        self._order = None

    def _new_node(self, numeric: int, created: str) -> dict[str, Any]:
        email = f"customer{numeric}@example.com"
        phone = f"+1555{numeric % 10_000_000:07d}"
        return {
            "id": f"gid://shopify/Customer/{numeric}",
            "legacyResourceId": str(numeric),
            "firstName": f"First{numeric}",
            "lastName": f"Last{numeric}",
            "displayName": f"First{numeric} Last{numeric}",
            "defaultEmailAddress": {"emailAddress": email, "marketingState": "NOT_SUBSCRIBED"},
            "defaultPhoneNumber": {"phoneNumber": phone, "marketingState": "NOT_SUBSCRIBED"},
            "email": email,
            "phone": phone,
            "note": None,
            "tags": [],
            "state": "ENABLED",
            "verifiedEmail": True,
            "createdAt": created,
        }

    def add_customer(self, *, at: dt.datetime | None = None, **fields: Any) -> int:
        """Add one customer (GraphQL field names); returns its numeric id."""
        with self._lock:
            if "legacyResourceId" in fields:
                numeric = int(fields["legacyResourceId"])
            elif "id" in fields:
                numeric = int(str(fields["id"]).rsplit("/", 1)[-1])
            else:
                numeric = self._next_id
            self._next_id = max(self._next_id, numeric + 1)
            when = at or (_instant(fields["updatedAt"]) if "updatedAt" in fields else self._tick())
            node = self._new_node(numeric, self._render(when))
            node.update({k: v for k, v in fields.items() if k != "updatedAt"})
            self._put(node, when)
            return numeric

    def _tick(self) -> dt.datetime:
        return self._latest + dt.timedelta(seconds=1)

    def update_customer(
        self, numeric: int, *, at: dt.datetime | None = None, **fields: Any
    ) -> None:
        """Change fields and bump updatedAt (to `at`, default one second after the latest)."""
        with self._lock:
            node = dict(self._nodes[numeric])
            node.update(fields)
            self._put(node, at or self._tick())

    def generate(
        self, n: int, *, start: dt.datetime = EPOCH, step: dt.timedelta = dt.timedelta(seconds=1)
    ) -> list[int]:
        """Add `n` customers updated at start, start+step, …; fast (100k in about a second)."""
        with self._lock:
            first = self._next_id
            ids = list(range(first, first + n))
            for offset, numeric in enumerate(ids):
                when = start + step * offset
                rendered = self._render(when)
                self._put(self._new_node(numeric, rendered), when, rendered)
            self._next_id = first + n
            return ids

    def customer(self, numeric: int) -> dict[str, Any]:
        with self._lock:
            return dict(self._nodes[numeric])

    def updated_at(self, numeric: int) -> dt.datetime:
        return self._updated[numeric]

    @property
    def latest(self) -> dt.datetime:
        return self._latest

    def ids(self) -> list[int]:
        return [numeric for _, numeric in self._sorted()]

    def _sorted(self) -> list[tuple[dt.datetime, int]]:
        if self._order is None:
            self._order = sorted((when, numeric) for numeric, when in self._updated.items())
        return self._order

    # --- faults --------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        with self._lock:
            self._fail_next.extend([status] * n)

    def timeout_next(self, n: int = 1) -> None:
        with self._lock:
            self._timeout_next += n

    # --- protocol ------------------------------------------------------------------------

    @staticmethod
    def encode_cursor(key: tuple[dt.datetime, int]) -> str:
        raw = json.dumps([key[0].isoformat(), key[1]]).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @staticmethod
    def decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
        when, numeric = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return _instant(when), int(numeric)

    def _leak(self) -> None:
        now = self._clock()
        self._available = min(
            self.bucket_max, self._available + (now - self._last_leak) * self.restore_rate
        )
        self._last_leak = now

    def _cost(self, requested: float, actual: float | None) -> dict[str, Any]:
        return {
            "requestedQueryCost": requested,
            "actualQueryCost": actual,
            "throttleStatus": {
                "maximumAvailable": self.bucket_max,
                "currentlyAvailable": self._available,
                "restoreRate": self.restore_rate,
            },
        }

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler; an injected timeout raises httpx.ReadTimeout."""
        response = self.respond(request)
        if response is None:
            raise httpx.ReadTimeout("fake shopify timed out", request=request)
        return response

    def respond(self, request: httpx.Request) -> httpx.Response | None:
        """One answer, or None for an injected timeout (the transport decides how to time out)."""
        with self._lock:
            self.requests += 1
            match = _PATH.match(request.url.path)
            if request.method != "POST" or match is None or match.group(1) != self.api_version:
                return httpx.Response(404, json={"errors": "Not Found"})
            if request.headers.get("X-Shopify-Access-Token") != self.access_token:
                return httpx.Response(
                    401,
                    json={"errors": "[API] Invalid API key or access token (unrecognized login)"},
                )
            if self._fail_next:
                self.faults += 1
                return httpx.Response(self._fail_next.pop(0), json={"errors": "Internal error"})
            if self._timeout_next:
                self._timeout_next -= 1
                self.faults += 1
                return None
            if self.fault_rate and self._rng.random() < self.fault_rate:
                self.faults += 1
                if self._rng.random() < 0.5:
                    return None
                return httpx.Response(self._rng.choice([500, 502, 503]), text="upstream error")
            try:
                body = json.loads(request.content)
                query = body["query"]
                variables = body.get("variables") or {}
            except (ValueError, KeyError, TypeError):
                return httpx.Response(400, json={"errors": "Bad Request"})
            self.variables_seen.append(dict(variables))
            if "metafieldsSet(" in query:
                return self._metafields_set(variables)
            if query.lstrip().startswith("query Customer(") and "customer(id:" in query:
                return self._customer(variables)
            return self._customers(query, variables)

    def _metafields_set(self, variables: Mapping[str, Any]) -> httpx.Response:
        """`metafieldsSet(metafields: [...])`: atomic; userErrors for an unknown owner, a
        missing field, a key of the wrong length or more than 25 inputs (nothing is written)."""
        self.metafield_requests += 1
        inputs = variables.get("metafields")
        errors: list[dict[str, Any]] = []
        if not isinstance(inputs, list) or not 1 <= len(inputs) <= 25:
            errors.append(
                {"field": ["metafields"], "message": "1 to 25 metafields", "code": "INVALID"}
            )
            inputs = []
        for index, item in enumerate(inputs):
            where = ["metafields", str(index)]
            if not isinstance(item, Mapping):
                errors.append({"field": where, "message": "is invalid", "code": "INVALID"})
                continue
            for name in ("ownerId", "key", "value", "type"):
                if not item.get(name):
                    errors.append(
                        {"field": [*where, name], "message": "can't be blank", "code": "BLANK"}
                    )
            key = str(item.get("key") or "")
            if key and not 2 <= len(key) <= 64:
                errors.append(
                    {"field": [*where, "key"], "message": "is invalid", "code": "INVALID"}
                )
            numeric = str(item.get("ownerId") or "").rsplit("/", 1)[-1]
            if not (numeric.isdigit() and int(numeric) in self._nodes):
                errors.append(
                    {
                        "field": [*where, "ownerId"],
                        "message": "Owner does not exist.",
                        "code": "INVALID",
                    }
                )
        written: list[dict[str, Any]] = []
        if not errors:
            for item in inputs:
                ident = (str(item["ownerId"]), str(item.get("namespace") or "$app"), item["key"])
                value = {"type": str(item["type"]), "value": str(item["value"])}
                if self.metafields.get(ident) != value:
                    self.metafields[ident] = value
                    self.metafield_writes += 1
                written.append(
                    {
                        "id": f"gid://shopify/Metafield/{abs(hash(ident)) % 10**9}",
                        "namespace": ident[1],
                        "key": ident[2],
                        "value": value["value"],
                    }
                )
        return httpx.Response(
            200,
            json={
                "data": {
                    "metafieldsSet": {
                        "metafields": None if errors else written,
                        "userErrors": errors,
                    }
                },
                "extensions": {"cost": self._cost(10, 10)},
            },
        )

    def _customer(self, variables: Mapping[str, Any]) -> httpx.Response:
        """`customer(id: "gid://shopify/Customer/<n>")` → the node, or null when unknown."""
        gid = str(variables.get("id") or "")
        numeric = gid.rsplit("/", 1)[-1]
        node = self._nodes.get(int(numeric)) if numeric.isdigit() else None
        return httpx.Response(
            200, json={"data": {"customer": node}, "extensions": {"cost": self._cost(2, 1)}}
        )

    def _customers(self, query: str, variables: Mapping[str, Any]) -> httpx.Response:
        if "customers(" not in query or "sortKey: UPDATED_AT" not in query:
            return _gql_error("the fake only knows customers(sortKey: UPDATED_AT)", "UNSUPPORTED")
        first = variables.get("first")
        if not isinstance(first, int) or not 1 <= first <= 250:
            return _gql_error("first must be within 1..250", "BAD_REQUEST")
        lower: tuple[dt.datetime, bool] | None = None
        upper: tuple[dt.datetime, bool] | None = None
        search = variables.get("query") or ""
        try:
            for op, value in _FILTER.findall(search):
                when = _instant(value)
                if op.startswith(">"):
                    lower = (when, op == ">=")
                else:
                    upper = (when, op == "<=")
        except ValueError:
            return _gql_error(f"invalid date in query {search!r}", "BAD_REQUEST")
        if _FILTER.sub("", search).strip():
            return _gql_error(f"the fake cannot search {search!r}", "UNSUPPORTED")

        requested = float(2 + first * self.node_cost)
        self._leak()
        if self._available + 1e-6 < requested:
            self.throttled_answers += 1
            return httpx.Response(
                self.throttle_status,
                json={
                    "errors": [
                        {
                            "message": "Throttled",
                            "extensions": {
                                "code": "THROTTLED",
                                "documentation": "https://shopify.dev/api/usage/rate-limits",
                            },
                        }
                    ],
                    "extensions": {"cost": self._cost(requested, None)},
                },
            )

        order = self._sorted()
        start = 0
        if lower is not None:
            pivot = (lower[0], -1) if lower[1] else (lower[0], 1 << 62)
            start = bisect.bisect_left(order, pivot)
        after = variables.get("after")
        if after is not None:
            try:
                key = self.decode_cursor(after)
            except (ValueError, TypeError, binascii.Error):
                return _gql_error("Invalid cursor", "BAD_REQUEST")
            start = max(start, bisect.bisect_right(order, key))

        def within(item: tuple[dt.datetime, int]) -> bool:
            return upper is None or item[0] < upper[0] or (upper[1] and item[0] == upper[0])

        window = [item for item in order[start : start + first + 1] if within(item)]
        page, has_next = window[:first], len(window) > first
        end_cursor = self.encode_cursor(page[-1]) if page else None
        if self.repeat_cursor and after is not None:
            end_cursor = after
        actual = float(2 + len(page) * self.node_cost)
        self._available -= actual
        return httpx.Response(
            200,
            json={
                "data": {
                    "customers": {
                        "nodes": [self._nodes[numeric] for _, numeric in page],
                        "pageInfo": {"hasNextPage": has_next, "endCursor": end_cursor},
                    }
                },
                "extensions": {"cost": self._cost(requested, actual)},
            },
        )

    # --- real HTTP -----------------------------------------------------------------------

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Run `respond` as a real HTTP server on 127.0.0.1 (free port); yields its base URL."""
        with serve_http(self.respond, timeout_sleep=self.timeout_sleep, name="fake-shopify") as url:
            yield url
