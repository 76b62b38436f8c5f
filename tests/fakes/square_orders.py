"""A fake Square API for payments: ListLocations, ListPayments, ListPaymentRefunds, RetrieveOrder.

Payments and refunds are built from the official `square_webhook_payment_updated` /
`square_webhook_refund_created` samples in vectors.json (ids, amounts, customer, times
replaced). `payment_event(id)` / `refund_event(id)` render the webhook events for them.

ListPayments honours `location_id` (default: the first location, as Square does),
`updated_at_begin_time` with `sort_field=UPDATED_AT`, `cursor` and `limit`; ListPaymentRefunds
`begin_time` (created_at) and `location_id`. Faults: `fault_rate` (seeded) answers 5xx, 429 or
times out (`httpx.ReadTimeout`).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

VECTORS = Path("/work/shared/reference/vectors.json")


def _samples() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())["samples"]
    return data


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class FakeSquareOrders:
    def __init__(
        self,
        *,
        access_token: str = "tok",
        merchant_id: str = "MERCHANT1",
        locations: tuple[str, ...] = ("L1", "L2"),
        seed: int = 7,
        fault_rate: float = 0.0,
        max_page: int = 100,
    ) -> None:
        # Pages hold at most `max_page` items (`limit` is advisory on Square too).
        self.max_page = max_page
        self.access_token = access_token
        self.merchant_id = merchant_id
        self.locations = locations
        self.payments: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.fault_rate = fault_rate
        self.requests = 0
        self.faults = 0
        self.paths: list[str] = []

    # --- data ---------------------------------------------------------------------------------

    def add_payment(
        self,
        payment_id: str,
        *,
        customer_id: str | None,
        amount: int,
        at: dt.datetime,
        status: str = "COMPLETED",
        location_id: str | None = None,
        order_customer_id: str | None = None,
        currency: str = "USD",
    ) -> dict[str, Any]:
        payment: dict[str, Any] = copy.deepcopy(
            _samples()["square_webhook_payment_updated"]["json"]["data"]["object"]["payment"]
        )
        order_id = f"ORDER-{payment_id}"
        payment.update(
            id=payment_id,
            status=status,
            order_id=order_id,
            location_id=location_id or self.locations[0],
            created_at=_iso(at),
            updated_at=_iso(at),
            amount_money={"amount": amount, "currency": currency},
            approved_money={"amount": amount, "currency": currency},
            total_money={"amount": amount, "currency": currency},
        )
        if customer_id is not None:
            payment["customer_id"] = customer_id
        for cid in (customer_id, order_customer_id):
            if cid is not None and cid not in self.customers:
                self.add_customer(cid, at=at)
        self.payments[payment_id] = payment
        self.orders[order_id] = {
            "id": order_id,
            "location_id": payment["location_id"],
            "customer_id": order_customer_id or customer_id,
            "state": "COMPLETED",
        }
        return payment

    def add_customer(self, customer_id: str, *, at: dt.datetime) -> dict[str, Any]:
        """A customer shaped like the official ListCustomers sample, with its own id/email."""
        customer: dict[str, Any] = copy.deepcopy(
            _samples()["square_customer_list_customers_response"]["json"]["customers"][0]
        )
        customer.update(
            id=customer_id,
            given_name=f"Buyer {customer_id}",
            email_address=f"{customer_id.lower()}@example.com",
            phone_number=None,
            created_at=_iso(at),
            updated_at=_iso(at),
            version=1,
        )
        self.customers[customer_id] = customer
        return customer

    def add_refund(
        self,
        refund_id: str,
        payment_id: str,
        amount: int,
        *,
        at: dt.datetime,
        status: str = "COMPLETED",
    ) -> dict[str, Any]:
        refund: dict[str, Any] = copy.deepcopy(
            _samples()["square_webhook_refund_created"]["json"]["data"]["object"]["refund"]
        )
        payment = self.payments[payment_id]
        refund.update(
            id=refund_id,
            payment_id=payment_id,
            order_id=payment["order_id"],
            location_id=payment["location_id"],
            status=status,
            amount_money={"amount": amount, "currency": payment["amount_money"]["currency"]},
            created_at=_iso(at),
            updated_at=_iso(at),
        )
        self.refunds[refund_id] = refund
        payment["refunded_money"] = {
            "amount": payment.get("refunded_money", {}).get("amount", 0) + amount,
            "currency": payment["amount_money"]["currency"],
        }
        payment["updated_at"] = _iso(at)
        return refund

    def payment_event(self, payment_id: str, event_id: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = copy.deepcopy(_samples()["square_webhook_payment_updated"]["json"])
        event["event_id"] = (
            event_id or f"evt-{payment_id}-{self.payments[payment_id]['updated_at']}"
        )
        event["merchant_id"] = self.merchant_id
        event["data"]["id"] = payment_id
        event["data"]["object"]["payment"] = copy.deepcopy(self.payments[payment_id])
        return event

    def refund_event(self, refund_id: str, kind: str = "refund.created") -> dict[str, Any]:
        event: dict[str, Any] = copy.deepcopy(_samples()["square_webhook_refund_created"]["json"])
        event["event_id"] = f"evt-{refund_id}-{kind}"
        event["type"] = kind
        event["merchant_id"] = self.merchant_id
        event["data"]["id"] = refund_id
        event["data"]["object"]["refund"] = copy.deepcopy(self.refunds[refund_id])
        return event

    # --- HTTP ---------------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        response = self.respond(request)
        if response is None:
            raise httpx.ReadTimeout("fake square timed out", request=request)
        return response

    def respond(self, request: httpx.Request) -> httpx.Response | None:
        with self._lock:
            self.requests += 1
            if request.headers.get("Authorization") != f"Bearer {self.access_token}":
                return httpx.Response(
                    401,
                    json={"errors": [{"category": "AUTHENTICATION_ERROR", "code": "UNAUTHORIZED"}]},
                )
            if self.fault_rate and self._rng.random() < self.fault_rate:
                self.faults += 1
                kind = self._rng.choice(["5xx", "429", "timeout"])
                if kind == "timeout":
                    return None
                if kind == "429":
                    return httpx.Response(
                        429,
                        headers={"Retry-After": "0"},
                        json={"errors": [{"category": "RATE_LIMIT_ERROR", "code": "RATE_LIMITED"}]},
                    )
                return httpx.Response(
                    self._rng.choice([500, 502, 503]),
                    json={"errors": [{"category": "API_ERROR", "code": "INTERNAL_SERVER_ERROR"}]},
                )
            path = request.url.path
            self.paths.append(path)
            params = dict(request.url.params)
            if request.method == "GET" and path == "/v2/locations":
                return httpx.Response(
                    200,
                    json={"locations": [{"id": loc, "status": "ACTIVE"} for loc in self.locations]},
                )
            if request.method == "GET" and path == "/v2/payments":
                return self._list(
                    self.payments, "payments", params, "updated_at_begin_time", "updated_at"
                )
            if request.method == "GET" and path == "/v2/refunds":
                return self._list(self.refunds, "refunds", params, "begin_time", "created_at")
            if request.method == "GET" and path.startswith("/v2/customers/"):
                customer = self.customers.get(unquote(path.rsplit("/", 1)[1]))
                if customer is None:
                    return httpx.Response(
                        404,
                        json={
                            "errors": [{"category": "INVALID_REQUEST_ERROR", "code": "NOT_FOUND"}]
                        },
                    )
                return httpx.Response(200, json={"customer": copy.deepcopy(customer)})
            if request.method == "GET" and path.startswith("/v2/orders/"):
                order = self.orders.get(unquote(path.rsplit("/", 1)[1]))
                if order is None:
                    return httpx.Response(
                        404,
                        json={
                            "errors": [{"category": "INVALID_REQUEST_ERROR", "code": "NOT_FOUND"}]
                        },
                    )
                return httpx.Response(200, json={"order": order})
            return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND"}]})

    def _list(
        self,
        items: dict[str, dict[str, Any]],
        key: str,
        params: dict[str, str],
        since_param: str,
        field: str,
    ) -> httpx.Response:
        location = params.get("location_id", self.locations[0])
        rows = [i for i in items.values() if i["location_id"] == location]
        if since_param in params:
            since = _parse(params[since_param])
            rows = [i for i in rows if _parse(i[field]) >= since]
        rows.sort(key=lambda i: (i[field], i["id"]))
        start = int(params.get("cursor") or 0)
        limit = min(int(params.get("limit") or 100), 100, self.max_page)
        page = rows[start : start + limit]
        body: dict[str, Any] = {key: copy.deepcopy(page)}
        if start + limit < len(rows):
            body["cursor"] = str(start + limit)
        return httpx.Response(200, json=body)
