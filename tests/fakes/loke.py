"""A fake LOKE API (seed 004) and its OAuth2 token endpoint (seeds README facts).

- `POST /token` (`grant_type=client_credentials`; client id/secret by HTTP Basic or in the form):
  `{access_token, token_type: "Bearer", expires_in}`; a wrong client → 401 `invalid_client`,
  another grant → 400 `unsupported_grant_type`. Tokens expire after `token_lifetime` seconds of
  the injected clock; `revoke_tokens()` makes every issued token invalid at once.
- `GET /organizations/{org}/customers` — 1000 per page (`page_size`), the next page's cursor in
  the `X-Next-Page` header (passed back as `after`), `sort=created|updated` (`updated_order`:
  `asc` or `desc`, the seed does not say), `email`/`phoneNumber` exact-match filters;
- `GET /organizations/{org}/customers/{id}` (404 when unknown);
- `GET /organizations/{org}/customers/{id}/memberships` — `CustomerListTiny` items, 10 a page,
  `X-Next-Page` the same way;
- a missing/expired/revoked bearer token → 401; another organization → 403;
- rate limiting: 429 with `Retry-After` (`rate_limit=(capacity, per_second)` or `throttle_next`);
- faults: `fail_next`, `timeout_next`, `fault_rate` (random 500/502/503/timeouts).

Error bodies (`{"message": ...}`; OAuth2 `{"error", "error_description"}` on `/token`) are our
choice: the seed shows none. Customers are served without null fields, like the seed's examples.
In process: `httpx.MockTransport(fake.handle)`; over HTTP: `with fake.serve() as url:` — the
same server answers `/token` (use `url` as both the API base URL and the auth URL).
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
from urllib.parse import parse_qs, unquote, unquote_plus

import httpx

from tests.fakes.server import serve as serve_http

ORGANIZATION_ID = "01FAKEORG0000000000000000"
CLIENT_ID = "loke-test-client"
CLIENT_SECRET = "loke-test-secret"
BASE_URL = "https://fake-api.loke.test"
AUTH_URL = "https://fake-auth.loke.test"
PAGE_SIZE = 1000
MEMBERSHIP_PAGE_SIZE = 10
LISTS = (
    "Loyal Customers",
    "VIP",
    "Newsletter",
    "Lapsed",
    "Birthday Club",
    "Coffee Lovers",
    "Weekend Regulars",
    "Staff",
)
_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def _iso(value: dt.datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _message(status: int, message: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"message": message}, headers=headers)


def _oauth_error(status: int, code: str, description: str) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "error_description": description})


def _encode(*parts: str) -> str:
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode("ascii")


def _decode(cursor: str) -> list[str] | None:
    try:
        return base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8").split("\x1f")
    except (ValueError, UnicodeError):
        return None


class _Timeout:
    """Sentinel: this request hangs (served) or raises httpx.ReadTimeout (in process)."""


_TIMEOUT = _Timeout()


class FakeLoke:
    """State: one organization's customers (creation order), their list memberships, tokens."""

    def __init__(
        self,
        *,
        organization_id: str = ORGANIZATION_ID,
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        seed: int = 0,
        page_size: int = PAGE_SIZE,
        token_lifetime: float = 3600.0,
        updated_order: str = "asc",
        fault_rate: float = 0.0,
        rate_limit: tuple[float, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_sleep: float = 1.0,
    ) -> None:
        if updated_order not in ("asc", "desc"):
            raise ValueError("updated_order must be asc or desc")
        self.organization_id = organization_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.page_size = page_size
        self.token_lifetime = token_lifetime
        self.updated_order = updated_order
        self.fault_rate = fault_rate
        self.timeout_sleep = timeout_sleep
        self._clock = clock
        self._random = random.Random(seed)
        self._lock = threading.RLock()
        self._customers: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._raw: dict[int, list[Any]] = {}  # invalid items served after position i
        self._memberships: dict[str, list[dict[str, str]]] = {}
        self._lists = {name: f"01LIST{i:020d}" for i, name in enumerate(LISTS)}
        self._tokens: dict[str, float] = {}  # token → expiry (clock seconds)
        self._next = 0
        self._tick = 0
        self._fail: collections.deque[int] = collections.deque()
        self._throttle: collections.deque[float] = collections.deque()
        self._timeouts = 0
        self._token_failures: collections.deque[int] = collections.deque()
        self._rate = rate_limit
        self._tokens_left = rate_limit[0] if rate_limit else 0.0
        self._refilled_at = clock()
        # Counters.
        self.requests = 0  # every request received (token endpoint included)
        self.token_requests = 0  # tokens issued
        self.list_requests = 0  # 200 answers to the customer list
        self.membership_requests = 0  # 200 answers to memberships pages
        self.membership_customers: collections.Counter[str] = collections.Counter()
        self.customer_requests = 0  # 200 answers to get-a-customer
        self.throttled = 0
        self.faults = 0
        self.unauthorized = 0
        self.cursors: list[str | None] = []  # the `after` of every served list request
        self.sorts: list[str | None] = []  # the `sort` of every served list request
        self.auth_methods: list[str] = []  # "basic" / "post" per token request

    # -- data -------------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        """A strictly increasing `updatedAt` (one second per change)."""
        self._tick += 1
        return _EPOCH + dt.timedelta(seconds=self._tick)

    def _new_id(self) -> str:
        self._next += 1
        return f"01LOKE{self._next:020d}"

    def _append(self, customer: dict[str, Any], lists: tuple[str, ...]) -> str:
        cid = str(customer["id"])
        self._order.append(cid)
        self._customers[cid] = customer
        self._memberships[cid] = [
            {"id": self._lists.setdefault(name, f"01LIST{len(self._lists):020d}"), "name": name}
            for name in lists
        ]
        return cid

    def add_customer(self, *, lists: tuple[str, ...] = (), **fields: Any) -> str:
        """Add one customer (seed shape; None fields omitted) in `lists`; returns its id."""
        with self._lock:
            now = _iso(self._now())
            customer = {k: v for k, v in fields.items() if v is not None}
            customer["id"] = str(customer.get("id") or self._new_id())
            customer.setdefault("createdAt", now)
            customer.setdefault("updatedAt", now)
            customer.setdefault("firstName", "Customer")
            customer.setdefault("lastName", "Loke")
            return self._append(customer, lists)

    def add_raw(self, item: Any) -> None:
        """Serve `item` (anything, e.g. a record without an id) after the current last customer."""
        with self._lock:
            self._raw.setdefault(len(self._order), []).append(item)

    def generate(
        self, n: int, *, shared_phone_every: int = 0, many_lists_every: int = 0
    ) -> list[str]:
        """Add `n` plausible customers; returns their ids (fast: 10k in ~0.1 s).

        Every `shared_phone_every`-th customer (0: none) reuses the previous customer's phone
        number (LOKE does not keep phones unique); every `many_lists_every`-th one is in every
        list (more than one memberships page); the others are in 0-3 lists."""
        rng = self._random
        ids: list[str] = []
        names = list(self._lists)
        with self._lock:
            previous_phone: str | None = None
            for i in range(n):
                cid = self._new_id()
                stamp = _iso(self._now())
                number = self._next
                phone = f"+614{number % 100_000_000:08d}"
                if shared_phone_every and i % shared_phone_every == 0 and previous_phone:
                    phone = previous_phone
                previous_phone = phone
                earned = rng.randint(0, 5000)
                redeemed = rng.randint(0, earned)
                customer: dict[str, Any] = {
                    "id": cid,
                    "createdAt": stamp,
                    "updatedAt": stamp,
                    "firstName": f"First{number}",
                    "lastName": f"Last{number}",
                    "email": f"loke{number}@example.com",
                    "phoneNumber": phone,
                    "dob": f"{rng.randint(1950, 2005)}-{rng.randint(1, 12):02d}-"
                    f"{rng.randint(1, 28):02d}",
                    "gender": rng.choice(("MALE", "FEMALE", "OTHER")),
                    "hasAgreedToMarketing": rng.random() < 0.5,
                    "statistics": {
                        "lastPointsEarnedAt": "2021-08-23T02:06:24.000Z",
                        "lastSpentAt": "2021-08-23T02:06:23.000Z",
                        "pointsBalance": earned - redeemed,
                        "totalPointsEarned": earned,
                        "totalPointsRedeemed": redeemed,
                        "totalSpend": earned * 100,
                    },
                }
                if many_lists_every and i % many_lists_every == 0:
                    lists = tuple(names) + tuple(f"Campaign {k}" for k in range(6))
                else:
                    lists = tuple(rng.sample(names, rng.randint(0, 3)))
                self._append(customer, lists)
                ids.append(cid)
        return ids

    def update_customer(self, cid: str, **fields: Any) -> None:
        """Change fields (None removes one) and bump `updatedAt`."""
        with self._lock:
            customer = self._customers[cid]
            for key, value in fields.items():
                if value is None:
                    customer.pop(key, None)
                else:
                    customer[key] = value
            customer["updatedAt"] = _iso(self._now())

    def set_points(self, cid: str, points: int) -> None:
        """A points balance change (LOKE's statistics; `updatedAt` bumped too)."""
        with self._lock:
            stats = dict(self._customers[cid].get("statistics") or {})
            stats["pointsBalance"] = points
            self.update_customer(cid, statistics=stats)

    def set_lists(self, cid: str, lists: tuple[str, ...]) -> None:
        """Replace a customer's memberships (the customer record itself does not change)."""
        with self._lock:
            self._memberships[cid] = [
                {"id": self._lists.setdefault(n, f"01LIST{len(self._lists):020d}"), "name": n}
                for n in lists
            ]

    def delete_customer(self, cid: str) -> None:
        with self._lock:
            self._order.remove(cid)
            del self._customers[cid]
            del self._memberships[cid]

    def customer(self, cid: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._customers[cid])

    def lists_of(self, cid: str) -> list[str]:
        with self._lock:
            return [m["name"] for m in self._memberships[cid]]

    @property
    def customer_ids(self) -> list[str]:
        with self._lock:
            return list(self._order)

    # -- fault injection -------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def timeout_next(self, n: int = 1) -> None:
        with self._lock:
            self._timeouts += n

    def throttle_next(self, n: int = 1, retry_after: float = 1.0) -> None:
        with self._lock:
            self._throttle.extend([retry_after] * n)

    def fail_token_next(self, n: int = 1, status: int = 503) -> None:
        """The next `n` token requests fail with `status` (before any credential check)."""
        with self._lock:
            self._token_failures.extend([status] * n)

    def revoke_tokens(self) -> None:
        """Every token issued so far stops working (401 on its next use)."""
        with self._lock:
            self._tokens.clear()

    # -- the API ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The in-process entry point for `httpx.MockTransport`."""
        answer = self._respond(request)
        if isinstance(answer, _Timeout):
            raise httpx.ReadTimeout("fake loke: injected timeout", request=request)
        return answer

    def _injected_fault(self) -> httpx.Response | _Timeout | None:
        if self._timeouts:
            self._timeouts -= 1
            self.faults += 1
            return _TIMEOUT
        if self._fail:
            self.faults += 1
            return _message(self._fail.popleft(), "Internal Server Error")
        if self.fault_rate and self._random.random() < self.fault_rate:
            self.faults += 1
            kind = self._random.choice((500, 502, 503, 0))
            return _TIMEOUT if kind == 0 else _message(kind, "Internal Server Error")
        return None

    def _rate_limited(self) -> httpx.Response | None:
        wait: float | None = None
        if self._throttle:
            wait = self._throttle.popleft()
        elif self._rate is not None:
            capacity, per_second = self._rate
            now = self._clock()
            self._tokens_left = min(
                capacity, self._tokens_left + (now - self._refilled_at) * per_second
            )
            self._refilled_at = now
            if self._tokens_left >= 1.0:
                self._tokens_left -= 1.0
                return None
            wait = max(1.0, float(math.ceil((1.0 - self._tokens_left) / per_second)))
        if wait is None:
            return None
        self.throttled += 1
        value = str(int(wait)) if wait == int(wait) else str(wait)
        return _message(429, "Too Many Requests", {"Retry-After": value})

    def _respond(self, request: httpx.Request) -> httpx.Response | _Timeout:
        with self._lock:
            self.requests += 1
            if request.url.path.rstrip("/").endswith("/token") and request.method == "POST":
                return self._token(request)
            fault = self._injected_fault()
            if fault is not None:
                return fault
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else None
            expiry = self._tokens.get(token) if token else None
            if expiry is None or self._clock() >= expiry:
                self.unauthorized += 1
                return _message(401, "Unauthorized")
            limited = self._rate_limited()
            if limited is not None:
                return limited
            if request.method != "GET":
                return _message(405, "Method Not Allowed")
            parts = [unquote(p) for p in request.url.path.split("/") if p]
            if len(parts) < 3 or parts[0] != "organizations" or parts[2] != "customers":
                return _message(404, "Not Found")
            if parts[1] != self.organization_id:
                return _message(403, "Forbidden")
            if len(parts) == 3:
                return self._list(request)
            cid = parts[3]
            if cid not in self._customers or len(parts) > 5:
                return _message(404, "Not Found")
            if len(parts) == 4:
                self.customer_requests += 1
                return httpx.Response(200, json=dict(self._customers[cid]))
            if parts[4] == "memberships":
                return self._list_memberships(request, cid)
            return _message(404, "Not Found")

    def _token(self, request: httpx.Request) -> httpx.Response:
        if self._token_failures:
            self.faults += 1
            return _message(self._token_failures.popleft(), "Service Unavailable")
        if self.fault_rate and self._random.random() < self.fault_rate:
            self.faults += 1
            return _message(503, "Service Unavailable")
        form = {k: v[0] for k, v in parse_qs(request.content.decode("utf-8")).items()}
        client_id, secret, method = form.get("client_id"), form.get("client_secret"), "post"
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                pair = base64.b64decode(auth[6:]).decode("utf-8")
            except (ValueError, UnicodeError):
                return _oauth_error(401, "invalid_client", "Malformed client credentials.")
            raw_id, _, raw_secret = pair.partition(":")
            client_id, secret, method = unquote_plus(raw_id), unquote_plus(raw_secret), "basic"
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "Only client_credentials.")
        if client_id != self.client_id or secret != self.client_secret:
            self.unauthorized += 1
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        self.auth_methods.append(method)
        self.token_requests += 1
        token = f"loke-token-{self.token_requests}-{self._random.getrandbits(32):08x}"
        self._tokens[token] = self._clock() + self.token_lifetime
        return httpx.Response(
            200,
            json={
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_lifetime),
            },
        )

    def _sorted(self, sort: str | None) -> list[str]:
        if sort == "updated":
            return sorted(
                self._order,
                key=lambda c: (self._customers[c]["updatedAt"], c),
                reverse=self.updated_order == "desc",
            )
        return list(self._order)  # created (and the default): creation order

    def _list(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        sort = params.get("sort")
        if sort not in (None, "created", "updated"):
            return _message(400, "sort must be created or updated")
        order = self._sorted(sort)
        start = 0
        after = params.get("after")
        if after:
            decoded = _decode(after)
            if (
                not decoded
                or len(decoded) != 2
                or decoded[0] != (sort or "")
                or (decoded[1] not in self._customers)
            ):
                return _message(400, "invalid cursor")
            start = order.index(decoded[1]) + 1
        email, phone = params.get("email"), params.get("phoneNumber")
        if email or phone:
            order = [
                c
                for c in order
                if (not email or self._customers[c].get("email") == email)
                and (not phone or self._customers[c].get("phoneNumber") == phone)
            ]
            start = 0 if not after else start
        ids = order[start : start + self.page_size]
        data: list[Any] = []
        positions = {c: i for i, c in enumerate(self._order)} if self._raw else {}
        for cid in ids:
            data.extend(self._raw.get(positions.get(cid, -1), ()))
            data.append(dict(self._customers[cid]))
        more = start + self.page_size < len(order)
        if not more and not sort:
            data.extend(self._raw.get(len(self._order), ()))
        self.list_requests += 1
        self.cursors.append(after)
        self.sorts.append(sort)
        headers = {"X-Next-Page": _encode(sort or "", ids[-1])} if more and ids else {}
        return httpx.Response(200, json=data, headers=headers)

    def _list_memberships(self, request: httpx.Request, cid: str) -> httpx.Response:
        memberships = self._memberships[cid]
        start = 0
        after = request.url.params.get("after")
        if after:
            decoded = _decode(after)
            if not decoded or len(decoded) != 2 or decoded[0] != cid or not decoded[1].isdigit():
                return _message(400, "invalid cursor")
            start = int(decoded[1])
        page = memberships[start : start + MEMBERSHIP_PAGE_SIZE]
        following = start + MEMBERSHIP_PAGE_SIZE
        self.membership_requests += 1
        self.membership_customers[cid] += 1
        headers = (
            {"X-Next-Page": _encode(cid, str(following))} if following < len(memberships) else {}
        )
        return httpx.Response(200, json=[dict(m) for m in page], headers=headers)

    # -- real HTTP -------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run `handle` as a real HTTP server on 127.0.0.1; yields its base URL, which is both
        the API base URL and the auth URL (`{url}/token`)."""

        def respond(request: httpx.Request) -> httpx.Response | None:
            answer = self._respond(request)
            return None if isinstance(answer, _Timeout) else answer

        with serve_http(respond, timeout_sleep=self.timeout_sleep, name="fake-loke") as url:
            yield url
