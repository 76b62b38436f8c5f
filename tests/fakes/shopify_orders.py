"""A fake Shopify Admin API for orders: the GraphQL `orders` connection and REST webhook bodies.

`FakeShopifyOrders` keeps orders as GraphQL `Order` nodes and answers
`orders(first:, after:, sortKey: UPDATED_AT, query: "updated_at:>='…'")` with cursor paging;
`rest_order(id)` renders the same order as the REST body of an `orders/*` webhook and
`rest_refund(id)` as a `refunds/create` body (shapes of Shopify's REST Order/Refund resources;
the embedded customer follows the official `shopify_rest_customer_get` sample in vectors.json).

Faults: `fault_rate` (seeded) answers 5xx, HTTP 429 or times out (the transport raises
`httpx.ReadTimeout`); `fail_next` queues statuses.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import re
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

VECTORS = Path("/work/shared/reference/vectors.json")
_QUERY = re.compile(r"updated_at:>='([^']+)'")


def _sample_customer() -> dict[str, Any]:
    samples = json.loads(VECTORS.read_text())["samples"]
    customer: dict[str, Any] = dict(samples["shopify_rest_customer_get"]["json"]["customer"])
    return customer


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decimal(minor: int) -> str:
    return str((Decimal(minor) / 100).quantize(Decimal("0.01")))


class FakeShopifyOrders:
    """Orders of one shop. Amounts are given in minor units (USD, 2 decimals)."""

    def __init__(
        self,
        *,
        access_token: str = "tok",
        seed: int = 7,
        fault_rate: float = 0.0,
        max_page: int = 250,
    ) -> None:
        # Pages hold at most `max_page` nodes whatever `first` asks (many pages with few orders).
        self.max_page = max_page
        self.access_token = access_token
        self.orders: dict[int, dict[str, Any]] = {}
        self.customers: dict[int, dict[str, Any]] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.fault_rate = fault_rate
        self._fail_next: list[int] = []
        self.requests = 0
        self.faults = 0
        self.queries: list[str | None] = []

    # --- data ---------------------------------------------------------------------------------

    def add_order(
        self,
        order_id: int,
        *,
        customer_id: int | None,
        amount: int,
        at: dt.datetime,
        currency: str = "USD",
        status: str = "PAID",
        first_name: str = "Bob",
    ) -> dict[str, Any]:
        customer = None
        if customer_id is not None:
            base = _sample_customer()
            customer = {
                "id": f"gid://shopify/Customer/{customer_id}",
                "legacyResourceId": str(customer_id),
                "firstName": first_name,
                "lastName": base["last_name"],
                "defaultEmailAddress": {
                    "emailAddress": f"c{customer_id}@mail.example.com",
                    "marketingState": "NOT_SUBSCRIBED",
                },
                "defaultPhoneNumber": None,
                "email": f"c{customer_id}@mail.example.com",
                "phone": None,
                "updatedAt": _iso(at),
            }
        node = {
            "id": f"gid://shopify/Order/{order_id}",
            "legacyResourceId": str(order_id),
            "currencyCode": currency,
            "displayFinancialStatus": status,
            "cancelledAt": None,
            "createdAt": _iso(at),
            "updatedAt": _iso(at),
            "totalPriceSet": {"shopMoney": {"amount": _decimal(amount), "currencyCode": currency}},
            "customer": customer,
            "refunds": [],
        }
        self.orders[order_id] = node
        return node

    def refund(self, order_id: int, refund_id: int, amount: int, *, at: dt.datetime) -> None:
        node = self.orders[order_id]
        node["refunds"].append(
            {
                "id": f"gid://shopify/Refund/{refund_id}",
                "legacyResourceId": str(refund_id),
                "createdAt": _iso(at),
                "updatedAt": _iso(at),
                "totalRefundedSet": {
                    "shopMoney": {"amount": _decimal(amount), "currencyCode": node["currencyCode"]}
                },
            }
        )
        node["displayFinancialStatus"] = "PARTIALLY_REFUNDED"
        node["updatedAt"] = _iso(at)

    def cancel(self, order_id: int, *, at: dt.datetime) -> None:
        node = self.orders[order_id]
        node["cancelledAt"] = _iso(at)
        node["updatedAt"] = _iso(at)

    # --- REST webhook bodies -----------------------------------------------------------------

    def rest_order(self, order_id: int) -> dict[str, Any]:
        """The REST body of an `orders/paid|updated|cancelled` webhook for the order."""
        node = self.orders[order_id]
        customer = None
        if node["customer"] is not None:
            c = node["customer"]
            customer = {
                **_sample_customer(),
                "id": int(c["legacyResourceId"]),
                "admin_graphql_api_id": c["id"],
                "first_name": c["firstName"],
                "last_name": c["lastName"],
                "email": c["email"],
                "phone": None,
                "updated_at": c["updatedAt"],
            }
        return {
            "id": order_id,
            "admin_graphql_api_id": node["id"],
            "name": f"#{order_id}",
            "currency": node["currencyCode"],
            "presentment_currency": node["currencyCode"],
            "total_price": node["totalPriceSet"]["shopMoney"]["amount"],
            "financial_status": node["displayFinancialStatus"].lower(),
            "cancelled_at": node["cancelledAt"],
            "created_at": node["createdAt"],
            "updated_at": node["updatedAt"],
            "customer": customer,
            "refunds": [self._rest_refund(order_id, r) for r in node["refunds"]],
        }

    def _rest_refund(self, order_id: int, refund: dict[str, Any]) -> dict[str, Any]:
        money = refund["totalRefundedSet"]["shopMoney"]
        return {
            "id": int(refund["legacyResourceId"]),
            "admin_graphql_api_id": refund["id"],
            "order_id": order_id,
            "created_at": refund["createdAt"],
            "processed_at": refund["createdAt"],
            "transactions": [
                {
                    "id": int(refund["legacyResourceId"]) * 10,
                    "kind": "refund",
                    "status": "success",
                    "amount": money["amount"],
                    "currency": money["currencyCode"],
                }
            ],
        }

    def rest_refund(self, order_id: int, refund_id: int) -> dict[str, Any]:
        """The body of a `refunds/create` webhook."""
        for refund in self.orders[order_id]["refunds"]:
            if refund["legacyResourceId"] == str(refund_id):
                return self._rest_refund(order_id, refund)
        raise KeyError(refund_id)

    # --- HTTP ---------------------------------------------------------------------------------

    def fail_next(self, *statuses: int) -> None:
        self._fail_next.extend(statuses)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler; an injected timeout raises httpx.ReadTimeout."""
        response = self.respond(request)
        if response is None:
            raise httpx.ReadTimeout("fake shopify timed out", request=request)
        return response

    def respond(self, request: httpx.Request) -> httpx.Response | None:
        with self._lock:
            self.requests += 1
            if re.fullmatch(r"/admin/api/\d{4}-\d{2}/graphql\.json", request.url.path) is None:
                return httpx.Response(404, json={"errors": "Not Found"})
            if request.headers.get("X-Shopify-Access-Token") != self.access_token:
                return httpx.Response(401, json={"errors": "[API] Invalid API key"})
            if self._fail_next:
                self.faults += 1
                return httpx.Response(self._fail_next.pop(0), json={"errors": "Internal error"})
            if self.fault_rate and self._rng.random() < self.fault_rate:
                self.faults += 1
                kind = self._rng.choice(["5xx", "429", "timeout"])
                if kind == "timeout":
                    return None
                if kind == "429":
                    return httpx.Response(
                        429, headers={"Retry-After": "0"}, json={"errors": "Throttled"}
                    )
                return httpx.Response(self._rng.choice([500, 502, 503]), text="upstream error")
            body = json.loads(request.content)
            query, variables = body["query"], body.get("variables") or {}
            if "orders(" not in query:
                return httpx.Response(200, json={"errors": [{"message": "unsupported"}]})
            return self._orders(variables)

    def _orders(self, variables: dict[str, Any]) -> httpx.Response:
        search = variables.get("query")
        self.queries.append(search)
        since = None
        if search:
            match = _QUERY.search(search)
            assert match, search
            since = dt.datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        nodes = sorted(
            (n for n in self.orders.values()),
            key=lambda n: (n["updatedAt"], int(n["legacyResourceId"])),
        )
        if since is not None:
            nodes = [
                n
                for n in nodes
                if dt.datetime.fromisoformat(n["updatedAt"].replace("Z", "+00:00")) >= since
            ]
        start = 0
        after = variables.get("after")
        if after:
            start = int(base64.b64decode(after).decode())
        first = min(int(variables["first"]), self.max_page)
        page = nodes[start : start + first]
        end = start + len(page)
        has_next = end < len(nodes)
        return httpx.Response(
            200,
            json={
                "data": {
                    "orders": {
                        "nodes": json.loads(json.dumps(page)),
                        "pageInfo": {
                            "hasNextPage": has_next,
                            "endCursor": base64.b64encode(str(end).encode()).decode()
                            if has_next
                            else None,
                        },
                    }
                },
                "extensions": {
                    "cost": {
                        "requestedQueryCost": 2 + first * 8,
                        "actualQueryCost": 2 + len(page) * 8,
                        "throttleStatus": {
                            "maximumAvailable": 20000.0,
                            "currentlyAvailable": 19000.0,
                            "restoreRate": 1000.0,
                        },
                    }
                },
            },
        )
