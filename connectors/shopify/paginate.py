"""Walk Shopify customers (and, for reconciliation, orders) by `updatedAt`, one page per request,
resumable by cursor."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from connectors.errors import FatalError, SkippableRecord
from connectors.paginate import CursorPaginator, map_records
from connectors.records import ForeignOrder, OrderPage, Page
from connectors.shopify.client import ShopifyClient
from connectors.shopify.mapping import map_customer, map_order

MAX_PAGE_SIZE = 250
# Shopify's calculated cost of a connection: 2 + first * (the node + each nested object selected:
# defaultEmailAddress, defaultPhoneNumber). Only the first request uses this estimate; after it
# the client takes the server's own `requestedQueryCost`.
NODE_COST = 3

CUSTOMERS_QUERY = """
query Customers($first: Int!, $after: String, $query: String) {
  customers(first: $first, after: $after, sortKey: UPDATED_AT, query: $query) {
    nodes {
      id
      legacyResourceId
      firstName
      lastName
      displayName
      defaultEmailAddress { emailAddress marketingState }
      defaultPhoneNumber { phoneNumber marketingState }
      email
      phone
      note
      tags
      state
      verifiedEmail
      createdAt
      updatedAt
    }
    pageInfo { hasNextPage endCursor }
  }
}
""".strip()

log = structlog.get_logger(__name__)


def search_query(updated_since: dt.datetime | None, overlap: dt.timedelta) -> str | None:
    """`updated_at:>='<ISO UTC of updated_since - overlap>'`, or None for a full sync.

    Seconds are truncated (the window only widens); the overlap plus the idempotent upsert
    absorbs clock skew and records committed out of order at the source.
    """
    if updated_since is None:
        return None
    if updated_since.tzinfo is None:
        raise ValueError("updated_since must be timezone-aware")
    start = (updated_since - overlap).astimezone(dt.UTC)
    return f"updated_at:>='{start.strftime('%Y-%m-%dT%H:%M:%SZ')}'"


def _connection(data: Mapping[str, Any]) -> tuple[list[Any], bool, str | None]:
    connection = data.get("customers")
    if not isinstance(connection, Mapping):
        raise FatalError("shopify answer has no customers connection")
    nodes = connection.get("nodes")
    page_info = connection.get("pageInfo")
    if not isinstance(nodes, list) or not isinstance(page_info, Mapping):
        raise FatalError("shopify customers connection is malformed")
    has_next = page_info.get("hasNextPage") is True
    end_cursor = page_info.get("endCursor")
    if has_next and not (isinstance(end_cursor, str) and end_cursor):
        raise FatalError("shopify says there is a next page but gives no endCursor")
    return nodes, has_next, end_cursor if has_next else None


def iter_customer_pages(
    client: ShopifyClient,
    *,
    updated_since: dt.datetime | None,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
    cursor: str | None = None,
    page_size: int = MAX_PAGE_SIZE,
) -> Iterator[Page]:
    """Yield pages of customers sorted by `updatedAt`; incremental when `updated_since` is given.

    Each Page's `cursor` is the position after it (None on the last page): saved with the page's
    upsert, it resumes the run there. Records that cannot be mapped (no id) are logged and left
    out of the page.
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be within 1..{MAX_PAGE_SIZE}")
    query = search_query(updated_since, overlap)
    paginator = CursorPaginator(cursor)
    estimate = float(2 + page_size * NODE_COST)
    while not paginator.done:
        requests, throttled = client.requests, client.throttled
        variables = {"first": page_size, "after": paginator.cursor, "query": query}
        data = client.execute(CUSTOMERS_QUERY, variables, cost=estimate)
        nodes, _, next_cursor = _connection(data)
        records, skipped = map_records(nodes, map_customer, source="shopify")
        paginator.update_state(next_cursor)
        yield Page(
            records=records,
            skipped=skipped,
            cursor=next_cursor,
            requests=client.requests - requests,
            throttled=client.throttled - throttled,
        )


# --- orders (stamps reconciliation) ---------------------------------------------------------

ORDERS_PAGE_SIZE = 100
# 2 + first * (order + customer + its two contact objects + totalPriceSet + refunds' money).
ORDER_NODE_COST = 8

ORDERS_QUERY = """
query Orders($first: Int!, $after: String, $query: String) {
  orders(first: $first, after: $after, sortKey: UPDATED_AT, query: $query) {
    nodes {
      id
      legacyResourceId
      currencyCode
      displayFinancialStatus
      cancelledAt
      createdAt
      updatedAt
      totalPriceSet { shopMoney { amount currencyCode } }
      customer {
        id
        legacyResourceId
        firstName
        lastName
        defaultEmailAddress { emailAddress marketingState }
        defaultPhoneNumber { phoneNumber marketingState }
        email
        phone
        updatedAt
      }
      refunds(first: 20) {
        id
        legacyResourceId
        createdAt
        updatedAt
        totalRefundedSet { shopMoney { amount currencyCode } }
      }
    }
    pageInfo { hasNextPage endCursor }
  }
}
""".strip()


def iter_order_pages(
    client: ShopifyClient,
    *,
    updated_since: dt.datetime,
    overlap: dt.timedelta = dt.timedelta(minutes=5),
    cursor: str | None = None,
    page_size: int = ORDERS_PAGE_SIZE,
) -> Iterator[OrderPage]:
    """Yield pages of orders updated since `updated_since - overlap`, oldest change first.

    The GraphQL `orders` connection filtered with `updated_at:>='…'` and sorted by
    `UPDATED_AT`; the refunds of each order come with it. Without `read_all_orders` Shopify only
    shows the last 60 days of orders, which covers any reconciliation window.
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be within 1..{MAX_PAGE_SIZE}")
    query = search_query(updated_since, overlap)
    paginator = CursorPaginator(cursor)
    estimate = float(2 + page_size * ORDER_NODE_COST)
    while not paginator.done:
        requests, throttled = client.requests, client.throttled
        variables = {"first": page_size, "after": paginator.cursor, "query": query}
        data = client.execute(ORDERS_QUERY, variables, cost=estimate)
        connection = data.get("orders")
        if not isinstance(connection, Mapping):
            raise FatalError("shopify answer has no orders connection")
        nodes, _, next_cursor = _connection({"customers": connection})
        orders: list[ForeignOrder] = []
        skipped = 0
        for node in nodes:
            try:
                if not isinstance(node, Mapping):
                    raise SkippableRecord("not an object", code="not_object")
                orders.append(map_order(node))
            except SkippableRecord as exc:
                log.warning("connector.record.skipped", source="shopify", reason=str(exc))
                skipped += 1
        paginator.update_state(next_cursor)
        yield OrderPage(
            orders=tuple(orders),
            cursor=next_cursor,
            skipped=skipped,
            requests=client.requests - requests,
            throttled=client.throttled - throttled,
        )
