"""Order/payment/refund mapping (Shopify REST + GraphQL, Square) and the order pullers."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.errors import SkippableRecord
from connectors.ratelimit import make_budget
from connectors.records import currency_exponent, to_minor_units
from connectors.shopify.client import ShopifyClient
from connectors.shopify.mapping import map_order, map_webhook_order, map_webhook_refund
from connectors.shopify.paginate import iter_order_pages
from connectors.square.client import SquareClient
from connectors.square.mapping import map_payment, map_webhook_payment
from connectors.square.mapping import map_webhook_refund as map_square_refund_event
from connectors.square.paginate import fetch_order, iter_payment_pages, iter_refund_pages
from tests.fakes.shopify_orders import FakeShopifyOrders
from tests.fakes.square_orders import FakeSquareOrders

SAMPLES = json.loads(Path("/work/shared/reference/vectors.json").read_text())["samples"]
NOW = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("19.99", "USD", 1999),
        ("20", "USD", 2000),
        ("0.10", "EUR", 10),
        ("1500", "JPY", 1500),
        ("1.234", "KWD", 1234),
        ("1.999", "USD", None),  # more decimals than the currency has
        ("1.5", "JPY", None),
        ("abc", "USD", None),
        ("NaN", "USD", None),
        (1.5, "USD", None),  # never floats
    ],
)
def test_to_minor_units_is_exact(amount: Any, currency: str, minor: int | None) -> None:
    assert to_minor_units(amount, currency) == minor


def test_currency_exponents() -> None:
    assert (currency_exponent("usd"), currency_exponent("JPY"), currency_exponent("BHD")) == (
        2,
        0,
        3,
    )


def test_square_sample_payment_and_refund_events() -> None:
    payment = map_webhook_payment(SAMPLES["square_webhook_payment_updated"]["json"])
    assert payment.external_id == "hYy9pRFVxpDsO1FB05SunFWUe9JZY"
    assert payment.kind == "payment"
    assert (payment.amount, payment.currency, payment.paid, payment.cancelled) == (
        100,
        "USD",
        True,
        False,
    )
    assert payment.order_id == "03O3USaPaAaFnI6kkwB1JxGgBsUZY"
    assert payment.customer_external_id is None  # the sample has none: the order may
    assert payment.source_updated_at == dt.datetime(2020, 11, 22, 21, 19, 0, 831000, tzinfo=dt.UTC)
    refund = map_square_refund_event(SAMPLES["square_webhook_refund_created"]["json"])
    assert refund.order_external_id == "KkAkhdMsgzn59SM8A89WgKwekxLZY"  # the PAYMENT id
    assert (refund.amount, refund.status, refund.counts) == (1000, "PENDING", True)
    failed = {**SAMPLES["square_webhook_refund_created"]["json"]["data"]["object"]["refund"]}
    failed["status"] = "FAILED"
    from connectors.square.mapping import map_refund

    assert map_refund(failed).counts is False
    with pytest.raises(SkippableRecord):
        map_payment({"status": "COMPLETED"})
    canceled = map_payment({"id": "p", "status": "CANCELED", "amount_money": {"amount": 5}})
    assert (canceled.paid, canceled.cancelled) == (False, True)


def test_shopify_rest_and_graphql_give_the_same_order() -> None:
    fake = FakeShopifyOrders()
    fake.add_order(450789469, customer_id=207119551, amount=19965, at=NOW - dt.timedelta(hours=2))
    fake.refund(450789469, 509562969, 4100, at=NOW - dt.timedelta(hours=1))
    rest = map_webhook_order(fake.rest_order(450789469))
    graph = map_order(fake.orders[450789469])
    assert rest.external_id == graph.external_id == "450789469"
    assert rest.amount == graph.amount == 19965
    assert rest.currency == graph.currency == "USD"
    assert rest.paid
    assert graph.paid
    assert rest.customer_external_id == graph.customer_external_id == "207119551"
    assert rest.customer is not None
    assert rest.customer.first_name == "Bob"
    assert [(r.external_id, r.amount) for r in rest.refunds] == [("509562969", 4100)]
    assert [(r.external_id, r.amount) for r in graph.refunds] == [("509562969", 4100)]
    assert rest.source_updated_at == graph.source_updated_at
    refund = map_webhook_refund(fake.rest_refund(450789469, 509562969))
    assert (refund.order_external_id, refund.amount) == ("450789469", 4100)
    fake.cancel(450789469, at=NOW)
    assert map_webhook_order(fake.rest_order(450789469)).cancelled
    assert map_order(fake.orders[450789469]).cancelled


def test_shopify_order_payload_problems() -> None:
    with pytest.raises(SkippableRecord):
        map_webhook_order({"total_price": "1.00", "currency": "USD"})  # no id
    with pytest.raises(SkippableRecord):
        map_webhook_order({"id": 1, "total_price": "1.001", "currency": "USD"})
    with pytest.raises(SkippableRecord):
        map_webhook_order({"id": 1, "total_price": "1.00"})  # no currency
    pending = map_webhook_order(
        {"id": 2, "total_price": "5.00", "currency": "EUR", "financial_status": "pending"}
    )
    assert (pending.paid, pending.customer, pending.amount) == (False, None, 500)
    failed_tx = map_webhook_refund(
        {
            "id": 9,
            "order_id": 2,
            "transactions": [
                {"kind": "refund", "status": "failure", "amount": "5.00", "currency": "EUR"},
                {"kind": "refund", "status": "success", "amount": "1.25", "currency": "EUR"},
            ],
        }
    )
    assert failed_tx.amount == 125


def _budget() -> Any:
    return make_budget(redis_url=None, capacity=1e6, refill_per_second=1e6)


def test_shopify_order_pages_filter_on_updated_at_and_follow_cursors() -> None:
    fake = FakeShopifyOrders(max_page=2)
    for i in range(5):
        fake.add_order(10 + i, customer_id=1, amount=100, at=NOW - dt.timedelta(hours=5 - i))
    fake.add_order(1, customer_id=1, amount=100, at=NOW - dt.timedelta(days=5))
    with httpx.Client(
        base_url="https://shop.myshopify.com", transport=httpx.MockTransport(fake.handle)
    ) as http:
        client = ShopifyClient(
            http=http,
            shop_domain="shop.myshopify.com",
            access_token="tok",
            api_version="2026-10",
            budget=_budget(),
            sleep=lambda _s: None,
        )
        pages = list(iter_order_pages(client, updated_since=NOW - dt.timedelta(hours=6)))
    assert [[o.external_id for o in p.orders] for p in pages] == [
        ["10", "11"],
        ["12", "13"],
        ["14"],
    ]
    assert fake.queries == ["updated_at:>='2026-11-22T02:55:00Z'"] * 3
    assert [p.cursor is None for p in pages] == [False, False, True]


def test_square_payment_and_refund_pages_per_location() -> None:
    fake = FakeSquareOrders(max_page=1)
    fake.add_payment("A", customer_id="C1", amount=100, at=NOW - dt.timedelta(hours=3))
    fake.add_payment(
        "B",
        customer_id=None,
        amount=200,
        at=NOW - dt.timedelta(hours=2),
        location_id="L2",
        order_customer_id="C2",
    )
    fake.add_payment("OLD", customer_id="C1", amount=100, at=NOW - dt.timedelta(days=9))
    fake.add_refund("R", "A", 50, at=NOW - dt.timedelta(hours=1))
    with httpx.Client(
        base_url="https://connect.squareup.com", transport=httpx.MockTransport(fake.handle)
    ) as http:
        client = SquareClient(
            http=http,
            access_token="tok",
            square_version="2026-08-19",
            budget=_budget(),
            budget_key="square:M",
            sleep=lambda _s: None,
        )
        since = NOW - dt.timedelta(hours=6)
        l1 = [
            o.external_id
            for p in iter_payment_pages(client, updated_since=since, location_id="L1")
            for o in p.orders
        ]
        l2 = [
            o.external_id
            for p in iter_payment_pages(client, updated_since=since, location_id="L2")
            for o in p.orders
        ]
        refunds = [
            r.external_id
            for p in iter_refund_pages(client, updated_since=since, location_id="L1")
            for r in p.refunds
        ]
        order = fetch_order(client, "ORDER-B")
        missing = fetch_order(client, "NOPE")
    assert (l1, l2, refunds) == (["A"], ["B"], ["R"])  # "A" was updated by its refund: in window
    assert order is not None
    assert order["customer_id"] == "C2"
    assert missing is None
