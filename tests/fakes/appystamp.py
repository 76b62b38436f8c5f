"""A fake Appy Stamp REST API built from the seed (003) and its README facts.

- `GET /customers` (oldest first) with `limit` 1-1000 (default 20) and `after` cursors
  (`base64("id:<last id>")`, like the seed's `aWQ6NjY3Nzg4OTkwMA==`), answered in the envelope
  `{success, data, meta: {pagination: {hasNext, hasPrevious, nextCursor, previousCursor,
  count}}, timestamp}`; null fields omitted;
- `GET /customers/{id}` (404 `CUSTOMER_NOT_FOUND`), `GET /customers/{id}/activities` (the stamp
  ledger, `stampChange` ±, paged the same way; 403 `PLAN_UPGRADE_REQUIRED` when the plan has
  none);
- `X-Api-Key` + `X-Api-Secret` (401 `UNAUTHORIZED`), 403 `API_ACCESS_DISABLED` when switched off;
- rate limiting: 429 `RATE_LIMITED` with `Retry-After` or `X-RateLimit-Reset` (epoch seconds);
- faults: `fail_next`, `timeout_next`, `fault_rate` (random 500/502/503/timeouts);
- merges (`mergedIntoCustomerId`, balance moved with activities on both sides), exclusions
  (`state: removed`), raw invalid records (`add_raw`).

The error body (`{success: false, error: {code, message}, timestamp}`) is our choice: the seed
does not show one. In process: `httpx.MockTransport(fake.handle)`; over HTTP: `fake.serve()`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import httpx

from tests.fakes.server import serve as serve_http

API_KEY = "appy-test-key"
API_SECRET = "appy-test-secret"
BASE_URL = "https://fake.appystamp.test/rest_api/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 20
FIRST_ID = 6_677_889_900
STATES = ("active", "active", "active", "active", "removed")


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def error(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """An Appy Stamp-style error answer."""
    return httpx.Response(
        status,
        json={
            "success": False,
            "error": {"code": code, "message": message},
            "timestamp": _timestamp(),
        },
        headers=headers,
    )


def encode_cursor(last_id: str) -> str:
    return base64.b64encode(f"id:{last_id}".encode()).decode("ascii")


def decode_cursor(cursor: str) -> str | None:
    try:
        text = base64.b64decode(cursor.encode("ascii"), validate=True).decode("utf-8")
    except (ValueError, UnicodeError):
        return None
    return text[3:] if text.startswith("id:") else None


class _Timeout:
    """Sentinel: this request hangs (served) or raises httpx.ReadTimeout (in process)."""


_TIMEOUT = _Timeout()


class FakeAppyStamp:
    """State: customers in creation order, each with its activities (the stamp ledger)."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        api_secret: str = API_SECRET,
        seed: int = 0,
        fault_rate: float = 0.0,
        rate_limit: tuple[float, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_sleep: float = 1.0,
        activities_enabled: bool = True,
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.fault_rate = fault_rate
        self.timeout_sleep = timeout_sleep
        self.activities_enabled = activities_enabled
        self.access_disabled = False
        self._clock = clock
        self._random = random.Random(seed)
        self._lock = threading.RLock()
        self._customers: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._position: dict[str, int] = {}
        self._raw: dict[int, list[Any]] = {}  # invalid items served after position i
        self._activities: dict[str, list[dict[str, Any]]] = {}
        self._next_id = FIRST_ID
        self._next_activity = 1
        self._fail: collections.deque[int] = collections.deque()
        self._throttle: collections.deque[tuple[float, str]] = collections.deque()
        self._timeouts = 0
        self._rate = rate_limit
        self._tokens = rate_limit[0] if rate_limit else 0.0
        self._refilled_at = clock()
        # Counters.
        self.requests = 0  # every request received
        self.list_requests = 0  # 200 answers to GET /customers
        self.activity_requests = 0  # 200 answers to GET /customers/{id}/activities
        self.throttled = 0
        self.faults = 0
        self.unauthorized = 0
        self.cursors: list[str | None] = []  # the `after` of every served list request

    # -- data -------------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _append(self, customer: dict[str, Any]) -> None:
        cid = customer["id"]
        self._position[cid] = len(self._order)
        self._order.append(cid)
        self._customers[cid] = customer
        self._activities.setdefault(cid, [])

    def add_customer(self, *, activities: tuple[int, ...] = (), **fields: Any) -> str:
        """Add one customer (seed shape; None fields omitted); `activities` are its stamp
        changes, and `stampBalance` their sum unless given. Returns its id."""
        with self._lock:
            customer = {k: v for k, v in fields.items() if v is not None}
            customer["id"] = str(customer.get("id") or self._new_id())
            customer.setdefault("state", "active")
            customer.setdefault("cards", 0)
            self._append(customer)
            for change in activities:
                self._add_activity(customer["id"], change, "earn" if change > 0 else "redeem")
            customer.setdefault("stampBalance", sum(activities))
            return str(customer["id"])

    def add_raw(self, item: Any) -> None:
        """Serve `item` (anything, e.g. a record without an id) after the current last customer."""
        with self._lock:
            self._raw.setdefault(len(self._order), []).append(item)

    def _add_activity(self, cid: str, change: int, kind: str) -> None:
        activity = {
            "id": str(self._next_activity),
            "stampChange": change,
            "type": kind,
            "createdAt": "2025-01-01T00:00:00Z",
        }
        self._next_activity += 1
        self._activities[cid].append(activity)

    def generate(self, n: int, *, excluded_every: int = 0) -> list[str]:
        """Add `n` plausible customers, each with 1-3 activities whose sum is its balance; every
        `excluded_every`-th one (0: none) is `removed`. Returns their ids (fast: 10k in ~0.1 s)."""
        rng = self._random
        ids: list[str] = []
        with self._lock:
            for i in range(n):
                cid = self._new_id()
                earned = rng.randint(1, 40)
                changes = [earned]
                if rng.random() < 0.3:
                    changes.append(-rng.randint(1, earned))
                customer: dict[str, Any] = {
                    "id": cid,
                    "firstName": f"First{cid[-6:]}",
                    "lastName": f"Last{cid[-6:]}",
                    "email": f"appy{cid}@example.com",
                    "stampBalance": sum(changes),
                    "cards": earned // 10,
                    "stampsToNextReward": 10 - sum(changes) % 10,
                    "dateOfBirth": f"{rng.randint(1, 28):02d}-{rng.randint(1, 12):02d}",
                    "state": "removed" if excluded_every and i % excluded_every == 0 else "active",
                }
                if rng.random() < 0.5:
                    customer["vipTierId"] = 3
                    customer["vipTierName"] = "Gold"
                self._append(customer)
                for change in changes:
                    self._add_activity(cid, change, "earn" if change > 0 else "redeem")
                ids.append(cid)
        return ids

    def update_customer(self, cid: str, **fields: Any) -> None:
        """Change fields (None removes the field, as the API omits nulls)."""
        with self._lock:
            customer = self._customers[cid]
            for key, value in fields.items():
                if value is None:
                    customer.pop(key, None)
                else:
                    customer[key] = value

    def add_stamps(self, cid: str, change: int) -> None:
        """An activity (earn/redeem) that moves the balance."""
        with self._lock:
            kind = "earn" if change > 0 else "redeem"
            self._add_activity(cid, change, kind)
            self._customers[cid]["stampBalance"] += change

    def set_state(self, cid: str, state: str) -> None:
        self.update_customer(cid, state=state)

    def merge(self, loser: str, winner: str) -> None:
        """Appy Stamp merges `loser` into `winner`: the balance moves (an activity on each
        side) and the loser says `mergedIntoCustomerId`."""
        with self._lock:
            moved = self._customers[loser].get("stampBalance", 0)
            if moved:
                self._add_activity(loser, -moved, "merge_out")
                self._add_activity(winner, moved, "merge_in")
            self._customers[loser]["stampBalance"] = 0
            self._customers[loser]["mergedIntoCustomerId"] = winner
            self._customers[winner]["stampBalance"] = (
                self._customers[winner].get("stampBalance", 0) + moved
            )

    def customer(self, cid: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._customers[cid])

    @property
    def customer_ids(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def activities(self, cid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._activities[cid]]

    # -- fault injection -------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def timeout_next(self, n: int = 1) -> None:
        with self._lock:
            self._timeouts += n

    def throttle_next(
        self, n: int = 1, retry_after: float = 1.0, *, header: str = "retry-after"
    ) -> None:
        """Answer the next `n` requests 429 `RATE_LIMITED`; the wait goes in `Retry-After`
        (`header="retry-after"`) or as an epoch `X-RateLimit-Reset` (`header="reset"`)."""
        with self._lock:
            self._throttle.extend([(retry_after, header)] * n)

    # -- the API ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The in-process entry point for `httpx.MockTransport`."""
        answer = self._respond(request)
        if isinstance(answer, _Timeout):
            raise httpx.ReadTimeout("fake appystamp: injected timeout", request=request)
        return answer

    def _injected_fault(self) -> httpx.Response | _Timeout | None:
        if self._timeouts:
            self._timeouts -= 1
            self.faults += 1
            return _TIMEOUT
        if self._fail:
            self.faults += 1
            status = self._fail.popleft()
            return error(status, "INTERNAL_ERROR", "Something went wrong.")
        if self.fault_rate and self._random.random() < self.fault_rate:
            self.faults += 1
            kind = self._random.choice((500, 502, 503, 0))
            return _TIMEOUT if kind == 0 else error(kind, "INTERNAL_ERROR", "Something went wrong.")
        return None

    def _rate_limited(self) -> httpx.Response | None:
        wait: float | None = None
        header = "retry-after"
        if self._throttle:
            wait, header = self._throttle.popleft()
        elif self._rate is not None:
            capacity, per_second = self._rate
            now = self._clock()
            self._tokens = min(capacity, self._tokens + (now - self._refilled_at) * per_second)
            self._refilled_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            wait = max(1.0, float(math.ceil((1.0 - self._tokens) / per_second)))
        if wait is None:
            return None
        self.throttled += 1
        if header == "reset":
            headers = {"X-RateLimit-Reset": str(math.ceil(time.time() + wait))}
        else:
            headers = {"Retry-After": str(int(wait)) if wait == int(wait) else str(wait)}
        return error(429, "RATE_LIMITED", "Too many requests.", headers=headers)

    def _respond(self, request: httpx.Request) -> httpx.Response | _Timeout:
        with self._lock:
            self.requests += 1
            fault = self._injected_fault()
            if fault is not None:
                return fault
            if (
                request.headers.get("X-Api-Key") != self.api_key
                or request.headers.get("X-Api-Secret") != self.api_secret
            ):
                self.unauthorized += 1
                return error(401, "UNAUTHORIZED", "Invalid API credentials.")
            if self.access_disabled:
                return error(403, "API_ACCESS_DISABLED", "API access is disabled for this shop.")
            limited = self._rate_limited()
            if limited is not None:
                return limited
            if request.method != "GET":
                return error(405, "METHOD_NOT_ALLOWED", "Only GET is faked.")
            path = request.url.path
            index = path.find("/customers")
            parts = [unquote(p) for p in path[index:].split("/")[1:]] if index >= 0 else []
            if parts == ["customers"]:
                return self._list(request)
            if len(parts) in (2, 3) and parts[0] == "customers":
                if parts[1] not in self._customers:
                    return error(404, "CUSTOMER_NOT_FOUND", "Customer not found.")
                if len(parts) == 2:
                    return self._ok(self._customers[parts[1]], {})
                if parts[2] == "activities":
                    return self._list_activities(request, parts[1])
            return error(404, "NOT_FOUND", "No such endpoint.")

    @staticmethod
    def _ok(data: Any, meta: Mapping[str, Any]) -> httpx.Response:
        return httpx.Response(
            200, json={"success": True, "data": data, "meta": dict(meta), "timestamp": _timestamp()}
        )

    @staticmethod
    def _limit(request: httpx.Request) -> int | None:
        raw = request.url.params.get("limit")
        if raw is None:
            return DEFAULT_LIMIT
        try:
            limit = int(raw)
        except ValueError:
            return None
        return limit if 1 <= limit <= MAX_LIMIT else None

    @staticmethod
    def _pagination(has_next: bool, start: int, next_cursor: str | None) -> dict[str, Any]:
        return {
            "pagination": {
                "hasNext": has_next,
                "hasPrevious": start > 0,
                "nextCursor": next_cursor,
                "previousCursor": None,
                "count": None,
            }
        }

    def _list(self, request: httpx.Request) -> httpx.Response:
        limit = self._limit(request)
        if limit is None:
            return error(400, "VALIDATION_ERROR", "limit must be between 1 and 1000.")
        after = request.url.params.get("after")
        start = 0
        if after:
            last = decode_cursor(after)
            if last is None or last not in self._position:
                return error(400, "INVALID_CURSOR", "The cursor is not valid.")
            start = self._position[last] + 1
        ids = self._order[start : start + limit]
        data: list[Any] = []
        for offset, cid in enumerate(ids):
            data.extend(self._raw.get(start + offset, ()))
            data.append(dict(self._customers[cid]))
        has_next = start + limit < len(self._order)
        if not has_next:
            data.extend(self._raw.get(len(self._order), ()))
        self.list_requests += 1
        self.cursors.append(after)
        cursor = encode_cursor(ids[-1]) if has_next and ids else None
        return self._ok(data, self._pagination(has_next, start, cursor))

    def _list_activities(self, request: httpx.Request, cid: str) -> httpx.Response:
        if not self.activities_enabled:
            return error(403, "PLAN_UPGRADE_REQUIRED", "Upgrade your plan to read activities.")
        limit = self._limit(request)
        if limit is None:
            return error(400, "VALIDATION_ERROR", "limit must be between 1 and 1000.")
        activities = self._activities[cid]
        start = 0
        after = request.url.params.get("after")
        if after:
            last = decode_cursor(after)
            positions = {a["id"]: i for i, a in enumerate(activities)}
            if last is None or last not in positions:
                return error(400, "INVALID_CURSOR", "The cursor is not valid.")
            start = positions[last] + 1
        page = activities[start : start + limit]
        has_next = start + limit < len(activities)
        self.activity_requests += 1
        cursor = encode_cursor(page[-1]["id"]) if has_next and page else None
        return self._ok([dict(a) for a in page], self._pagination(has_next, start, cursor))

    # -- real HTTP -------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run `handle` as a real HTTP server on 127.0.0.1; yields its base URL (with the
        `/rest_api/v1` prefix, like the real API's)."""

        def respond(request: httpx.Request) -> httpx.Response | None:
            answer = self._respond(request)
            return None if isinstance(answer, _Timeout) else answer

        with serve_http(respond, timeout_sleep=self.timeout_sleep, name="fake-appystamp") as url:
            yield f"{url}/rest_api/v1"
