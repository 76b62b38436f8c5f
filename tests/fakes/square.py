"""A fake Square Customers API that behaves: SearchCustomers with the `updated_at` filter, real
cursor paging with cursors that expire, 429 `RATE_LIMITED` with `Retry-After`, 401 on a wrong
token, and 5xx/timeouts on demand.

In process: `httpx.Client(transport=httpx.MockTransport(fake.handle), base_url=...)`.
Over real HTTP: `with fake.serve() as base_url: ...` (a threaded server on 127.0.0.1).

Error bodies follow Square's envelope `{"errors": [{"category", "code", "detail", "field"}]}`;
an expired or unknown cursor answers 400 `INVALID_REQUEST_ERROR`/`INVALID_CURSOR` on field
`cursor` (the code is in Square's ErrorCode enum; the exact `detail` wording is ours).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from connectors.records import parse_instant
from tests.fakes.server import serve as serve_http

SEARCH_PATH = "/v2/customers/search"
DEFINITIONS_PATH = "/v2/customers/custom-attribute-definitions"
_UPSERT_PATH = re.compile(r"^/v2/customers/([^/]+)/custom-attributes/([^/]+)$")
_ATTRIBUTE_KEY = re.compile(r"^[a-zA-Z0-9._-]{1,60}$")
VISIBILITIES = frozenset(
    {"VISIBILITY_HIDDEN", "VISIBILITY_READ_ONLY", "VISIBILITY_READ_WRITE_VALUES"}
)
DEFAULT_TOKEN = "square-test-token"
MAX_LIMIT = 100


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_instant(value: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, the way Square writes timestamps."""
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(
    status: int,
    category: str,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    error: dict[str, str] = {"category": category, "code": code, "detail": detail}
    if field is not None:
        error["field"] = field
    return httpx.Response(status, json={"errors": [error]}, headers=headers)


class _Timeout:
    """Sentinel: this request hangs (served) or raises httpx.ReadTimeout (in process)."""


_TIMEOUT = _Timeout()


@dataclass(slots=True)
class _Cursor:
    fingerprint: str
    offset: int
    issued_at: int


class FakeSquare:
    """State: customers (insertion order = Square's DEFAULT order) with update times."""

    def __init__(
        self,
        *,
        customers: Iterable[Mapping[str, Any]] = (),
        seed: int = 0,
        access_token: str = DEFAULT_TOKEN,
        cursor_ttl_requests: int | None = None,
        rate_limit: tuple[float, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = _now,
        fault_rate: float = 0.0,
        timeout_sleep: float = 1.0,
    ) -> None:
        self.access_token = access_token
        self.cursor_ttl_requests = cursor_ttl_requests
        self.fault_rate = fault_rate
        self.timeout_sleep = timeout_sleep
        self._clock = clock
        self._now = now
        self._random = random.Random(seed)
        self._lock = threading.RLock()
        self._customers: dict[str, dict[str, Any]] = {}
        self._updated: dict[str, dt.datetime] = {}
        self._created: dict[str, dt.datetime] = {}
        self._generation = 0
        self._cache: dict[str, tuple[int, list[str]]] = {}
        self._cursors: dict[str, _Cursor] = {}
        self._fail: collections.deque[int] = collections.deque()
        self._throttle: collections.deque[float] = collections.deque()
        self._timeouts = 0
        self._next_id = 0
        self._rate = rate_limit
        self._tokens = rate_limit[0] if rate_limit else 0.0
        self._refilled_at = clock()
        # Counters.
        self.requests = 0  # every request received
        self.served = 0  # 200 answers to a search
        self.throttled = 0  # 429 answers
        self.faults = 0  # injected 5xx and timeouts
        self.invalid_cursors = 0  # 400 INVALID_CURSOR answers
        self.unauthorized = 0  # 401 answers
        self.bodies: list[dict[str, Any]] = []  # every search body that reached the search
        # Customer custom attributes: definitions by key; values by (customer id, key); upsert
        # answers by idempotency key (a replay gets the first answer, writes nothing).
        self.attribute_definitions: dict[str, dict[str, Any]] = {}
        self.custom_attributes: dict[tuple[str, str], dict[str, Any]] = {}
        self.definition_requests = 0
        self.attribute_writes = 0  # upserts that wrote (not idempotent replays)
        self._upserts: dict[str, dict[str, Any]] = {}
        for customer in customers:
            self.add_customer(**customer)

    # -- data helpers ---------------------------------------------------------------------

    def _new_id(self) -> str:
        self._next_id += 1
        return f"SQ{self._next_id:024d}"

    def _store(self, customer: dict[str, Any], updated: dt.datetime, created: dt.datetime) -> None:
        cid = customer["id"]
        self._customers[cid] = customer
        self._updated[cid] = updated
        self._created[cid] = created
        self._generation += 1

    def add_customer(self, **fields: Any) -> dict[str, Any]:
        """Add one customer (Square shape); id, timestamps and version filled in when absent."""
        with self._lock:
            now = self._now()
            customer = dict(fields)
            customer.setdefault("id", self._new_id())
            created = parse_instant(customer.get("created_at")) or now
            updated = parse_instant(customer.get("updated_at")) or created
            customer.setdefault("created_at", format_instant(created))
            customer.setdefault("updated_at", format_instant(updated))
            customer.setdefault("version", 0)
            self._store(customer, updated, created)
            return dict(customer)

    def update_customer(self, customer_id: str, **fields: Any) -> dict[str, Any]:
        """Change fields, bump `version` and move `updated_at` to now (strictly forward)."""
        with self._lock:
            customer = dict(self._customers[customer_id])
            customer.update(fields)
            updated = max(self._now(), self._updated[customer_id] + dt.timedelta(milliseconds=1))
            customer["updated_at"] = format_instant(updated)
            customer["version"] = int(customer.get("version", 0)) + 1
            self._store(customer, updated, self._created[customer_id])
            return dict(customer)

    def delete_customer(self, customer_id: str) -> None:
        with self._lock:
            del self._customers[customer_id]
            del self._updated[customer_id]
            del self._created[customer_id]
            self._generation += 1

    def generate(
        self,
        n: int,
        *,
        updated_at: dt.datetime = dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        step: dt.timedelta = dt.timedelta(seconds=1),
    ) -> list[str]:
        """Add `n` plausible customers, updated at `updated_at + i·step`; returns their ids."""
        ids: list[str] = []
        with self._lock:
            for i in range(n):
                cid = self._new_id()
                at = updated_at + step * i
                stamp = format_instant(at)
                number = self._next_id
                self._customers[cid] = {
                    "id": cid,
                    "created_at": stamp,
                    "updated_at": stamp,
                    "given_name": f"Given{number}",
                    "family_name": f"Family{number}",
                    "email_address": f"customer{number}@example.com",
                    "phone_number": f"+1555{number % 10_000_000:07d}",
                    "preferences": {"email_unsubscribed": False},
                    "creation_source": "THIRD_PARTY",
                    "version": 0,
                }
                self._updated[cid] = at
                self._created[cid] = at
                ids.append(cid)
            self._generation += 1
        return ids

    @property
    def customer_ids(self) -> list[str]:
        with self._lock:
            return list(self._customers)

    def customer(self, customer_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._customers[customer_id])

    # -- fault injection ------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def timeout_next(self, n: int = 1) -> None:
        with self._lock:
            self._timeouts += n

    def throttle_next(self, n: int = 1, retry_after: float = 1.0) -> None:
        """Answer the next `n` requests with 429 `RATE_LIMITED` and this `Retry-After`."""
        with self._lock:
            self._throttle.extend([retry_after] * n)

    def expire_cursors(self) -> None:
        """Every cursor issued so far becomes invalid (400 INVALID_CURSOR)."""
        with self._lock:
            self._cursors.clear()

    # -- the API --------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The in-process entry point for `httpx.MockTransport`."""
        answer = self._respond(request)
        if isinstance(answer, _Timeout):
            raise httpx.ReadTimeout("fake square: injected timeout", request=request)
        return answer

    def _injected_fault(self) -> httpx.Response | _Timeout | None:
        if self._timeouts:
            self._timeouts -= 1
            self.faults += 1
            return _TIMEOUT
        if self._fail:
            self.faults += 1
            return self._server_error(self._fail.popleft())
        if self.fault_rate and self._random.random() < self.fault_rate:
            self.faults += 1
            kind = self._random.choice((500, 502, 503, 0))
            return _TIMEOUT if kind == 0 else self._server_error(kind)
        return None

    @staticmethod
    def _server_error(status: int) -> httpx.Response:
        if status == 429:
            return _error(429, "RATE_LIMIT_ERROR", "RATE_LIMITED", "Rate limited.")
        code = "SERVICE_UNAVAILABLE" if status == 503 else "INTERNAL_SERVER_ERROR"
        return _error(status, "API_ERROR", code, "An internal error occurred.")

    def _rate_limited(self) -> httpx.Response | None:
        retry_after: float | None = None
        if self._throttle:
            retry_after = self._throttle.popleft()
        elif self._rate is not None:
            capacity, per_second = self._rate
            now = self._clock()
            self._tokens = min(capacity, self._tokens + (now - self._refilled_at) * per_second)
            self._refilled_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            retry_after = max(1.0, float(math.ceil((1.0 - self._tokens) / per_second)))
        if retry_after is None:
            return None
        self.throttled += 1
        value = str(int(retry_after)) if retry_after == int(retry_after) else str(retry_after)
        return _error(
            429,
            "RATE_LIMIT_ERROR",
            "RATE_LIMITED",
            "Rate limited.",
            headers={"Retry-After": value},
        )

    def _respond(self, request: httpx.Request) -> httpx.Response | _Timeout:
        with self._lock:
            self.requests += 1
            number = self.requests
            fault = self._injected_fault()
            if fault is not None:
                return fault
            if request.headers.get("Authorization") != f"Bearer {self.access_token}":
                self.unauthorized += 1
                return _error(
                    401,
                    "AUTHENTICATION_ERROR",
                    "UNAUTHORIZED",
                    "This request could not be authorized.",
                )
            path = request.url.path
            if (
                request.method == "POST"
                and path != SEARCH_PATH
                and (path == DEFINITIONS_PATH or _UPSERT_PATH.match(path))
            ):
                return self._custom_attributes(request)
            if request.url.path != SEARCH_PATH:
                return _error(404, "INVALID_REQUEST_ERROR", "NOT_FOUND", "Resource not found.")
            if request.method != "POST":
                return _error(
                    405, "INVALID_REQUEST_ERROR", "METHOD_NOT_ALLOWED", "Method not allowed."
                )
            throttled = self._rate_limited()
            if throttled is not None:
                return throttled
            try:
                body = json.loads(request.content or b"{}")
            except ValueError:
                return _error(400, "INVALID_REQUEST_ERROR", "BAD_REQUEST", "Invalid JSON body.")
            if not isinstance(body, dict):
                return _error(400, "INVALID_REQUEST_ERROR", "BAD_REQUEST", "Body is not an object.")
            self.bodies.append(body)
            return self._search(body, number)

    def _custom_attributes(self, request: httpx.Request) -> httpx.Response:
        """CreateCustomerCustomAttributeDefinition and UpsertCustomerCustomAttribute."""
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            return _error(400, "INVALID_REQUEST_ERROR", "BAD_REQUEST", "Invalid JSON body.")
        if not isinstance(body, dict):
            return _error(400, "INVALID_REQUEST_ERROR", "BAD_REQUEST", "Body is not an object.")
        path = request.url.path
        if path == DEFINITIONS_PATH:
            self.definition_requests += 1
            definition = body.get("custom_attribute_definition")
            if not isinstance(definition, dict):
                return _error(
                    400,
                    "INVALID_REQUEST_ERROR",
                    "MISSING_REQUIRED_PARAMETER",
                    "Missing definition.",
                )
            key = str(definition.get("key") or "")
            if not _ATTRIBUTE_KEY.match(key):
                return _error(400, "INVALID_REQUEST_ERROR", "INVALID_VALUE", "Invalid key.")
            schema = definition.get("schema")
            if not isinstance(schema, dict) or "$ref" not in schema:
                return _error(
                    400,
                    "INVALID_REQUEST_ERROR",
                    "BAD_REQUEST",
                    "Missing required parameter schema",
                    field="schema",
                )
            visibility = definition.get("visibility", "VISIBILITY_HIDDEN")
            if visibility not in VISIBILITIES:
                return _error(400, "INVALID_REQUEST_ERROR", "INVALID_ENUM_VALUE", "Visibility.")
            if visibility != "VISIBILITY_HIDDEN" and not definition.get("name"):
                return _error(400, "INVALID_REQUEST_ERROR", "BAD_REQUEST", "Name is required.")
            if key in self.attribute_definitions:
                return _error(
                    409, "INVALID_REQUEST_ERROR", "CONFLICT", f"Definition {key} already exists."
                )
            stored = {**definition, "visibility": visibility, "version": 1}
            self.attribute_definitions[key] = stored
            return httpx.Response(200, json={"custom_attribute_definition": stored})
        match = _UPSERT_PATH.match(path)
        if match is None:
            return _error(404, "INVALID_REQUEST_ERROR", "NOT_FOUND", "Resource not found.")
        customer_id, key = match.group(1), match.group(2)
        idempotency_key = body.get("idempotency_key")
        if isinstance(idempotency_key, str) and idempotency_key in self._upserts:
            return httpx.Response(200, json=self._upserts[idempotency_key])
        if isinstance(idempotency_key, str) and not 1 <= len(idempotency_key) <= 45:
            return _error(400, "INVALID_REQUEST_ERROR", "INVALID_VALUE", "Idempotency key.")
        if key not in self.attribute_definitions:
            return _error(404, "INVALID_REQUEST_ERROR", "NOT_FOUND", f"Definition {key} not found.")
        if customer_id not in self._customers:
            return _error(404, "INVALID_REQUEST_ERROR", "NOT_FOUND", "Customer not found.")
        attribute = body.get("custom_attribute")
        if not isinstance(attribute, dict) or "value" not in attribute:
            return _error(
                400, "INVALID_REQUEST_ERROR", "MISSING_REQUIRED_PARAMETER", "Missing value."
            )
        previous = self.custom_attributes.get((customer_id, key))
        version = int(previous["version"]) + 1 if previous else 1
        stored = {"key": key, "value": attribute["value"], "version": version}
        self.custom_attributes[(customer_id, key)] = stored
        self.attribute_writes += 1
        answer = {"custom_attribute": stored}
        if isinstance(idempotency_key, str):
            self._upserts[idempotency_key] = answer
        return httpx.Response(200, json=answer)

    def _search(self, body: dict[str, Any], number: int) -> httpx.Response:
        limit = body.get("limit", MAX_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool):
            return _error(
                400, "INVALID_REQUEST_ERROR", "INVALID_VALUE", "Invalid limit.", field="limit"
            )
        if limit < 1:
            return _error(
                400,
                "INVALID_REQUEST_ERROR",
                "VALUE_TOO_LOW",
                f"`limit` must be greater than or equal to 1, got {limit}.",
                field="limit",
            )
        if limit > MAX_LIMIT:
            return _error(
                400,
                "INVALID_REQUEST_ERROR",
                "VALUE_TOO_HIGH",
                f"`limit` must be less than or equal to {MAX_LIMIT}, got {limit}.",
                field="limit",
            )
        query = body.get("query") or {}
        fingerprint = json.dumps(query, sort_keys=True)
        offset = 0
        cursor = body.get("cursor")
        if cursor is not None:
            state = self._cursors.get(cursor) if isinstance(cursor, str) else None
            expired = (
                state is None
                or state.fingerprint != fingerprint
                or (
                    self.cursor_ttl_requests is not None
                    and number - state.issued_at > self.cursor_ttl_requests
                )
            )
            if expired or state is None:
                self.invalid_cursors += 1
                return _error(
                    400,
                    "INVALID_REQUEST_ERROR",
                    "INVALID_CURSOR",
                    "The provided cursor is invalid or has expired.",
                    field="cursor",
                )
            offset = state.offset
        try:
            ids = self._matching(query, fingerprint)
        except ValueError as exc:
            return _error(400, "INVALID_REQUEST_ERROR", "INVALID_TIME", str(exc))
        chunk = ids[offset : offset + limit]
        answer: dict[str, Any] = {}
        if chunk:
            answer["customers"] = [self._customers[cid] for cid in chunk]
        if offset + limit < len(ids):
            token = f"{self._random.getrandbits(128):032x}"
            self._cursors[token] = _Cursor(fingerprint, offset + limit, number)
            answer["cursor"] = token
        self.served += 1
        return httpx.Response(200, json=answer)

    def _matching(self, query: Mapping[str, Any], fingerprint: str) -> list[str]:
        cached = self._cache.get(fingerprint)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        flt = query.get("filter") or {}
        updated_range = flt.get("updated_at") or {}
        created_range = flt.get("created_at") or {}
        ids = list(self._customers)
        for source, window in ((self._updated, updated_range), (self._created, created_range)):
            start = self._instant(window.get("start_at"))
            end = self._instant(window.get("end_at"))
            if start is not None:
                ids = [cid for cid in ids if source[cid] >= start]
            if end is not None:
                ids = [cid for cid in ids if source[cid] < end]
        sort = query.get("sort") or {}
        if sort.get("field") == "CREATED_AT":
            ids.sort(key=lambda cid: (self._created[cid], cid))
        if sort.get("order") == "DESC":
            ids.reverse()
        self._cache[fingerprint] = (self._generation, ids)
        return ids

    @staticmethod
    def _instant(value: Any) -> dt.datetime | None:
        if value is None:
            return None
        parsed = parse_instant(value)
        if parsed is None:
            raise ValueError(f"Invalid timestamp {value!r}.")
        return parsed

    # -- real HTTP ------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run `handle` as a real HTTP server on 127.0.0.1 (free port); yields its base URL."""

        def respond(request: httpx.Request) -> httpx.Response | None:
            answer = self._respond(request)
            return None if isinstance(answer, _Timeout) else answer

        with serve_http(respond, timeout_sleep=self.timeout_sleep, name="fake-square") as url:
            yield url
