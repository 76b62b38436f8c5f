"""Authentication and tenant isolation: 401 without a live token, 404 across stores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine

from models.accounts import create_token, revoke_token
from models.tables import (
    Customer,
    CustomerCard,
    ExternalReference,
    IdempotentRequest,
    OutboxMessage,
    StampLedgerEntry,
)
from tests.api_helpers import (
    StoreApi,
    assert_error,
    count,
    make_card,
    make_reward,
    session_of,
    store_api,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


@dataclass
class Route:
    method: str
    path: str  # relative to /api/v1/accounts/{account}; {customer}, {cc}, {reward} filled in
    body: dict[str, Any] | None = None
    ok: int = 200

    def takes_ids(self) -> bool:
        return "{customer}" in self.path


# Every route under /api/v1/accounts/{account_id}: the matrix must grow with the API.
ROUTES = [
    Route("GET", "/customers"),
    Route("GET", "/customers?search=Bea"),
    Route("GET", "/customers?source=square&external_id=B-1"),
    Route(
        "POST",
        "/customers",
        {"customer": {"first_name": "Intruder", "email": "intruder@example.com"}},
        ok=201,
    ),
    Route(  # create-as-upsert on B's existing reference
        "POST",
        "/customers",
        {
            "customer": {
                "first_name": "Hijack",
                "external_references": [{"source": "square", "external_id": "B-1"}],
            }
        },
    ),
    Route("GET", "/customers/{customer}"),
    Route("PATCH", "/customers/{customer}", {"customer": {"first_name": "Hacked"}}),
    Route("PUT", "/customers/{customer}", {"customer": {"metadata": {"owned": True}}}),
    Route("GET", "/customers/{customer}/customer_cards"),
    Route("GET", "/customers/{customer}/customer_cards/{cc}"),
    Route("POST", "/customers/{customer}/customer_cards/{cc}/stamp", {"stamps": 5}),
    Route("POST", "/customers/{customer}/customer_cards/{cc}/redeem", {"reward_id": "{reward}"}),
    Route("GET", "/cards"),
    Route("GET", "/cards?scope=all"),
]


def test_the_matrix_covers_every_store_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    prefix = "/api/v1/accounts/{account_id}"
    documented = {
        (method.upper(), path[len(prefix) :])
        for path, operations in spec["paths"].items()
        if path.startswith(prefix)
        for method in operations
    }
    covered = {
        (
            r.method,
            r.path.split("?")[0]
            .replace("{customer}", "{customer_id}")
            .replace("{cc}", "{card_id}"),
        )
        for r in ROUTES
    }
    assert documented == covered


@dataclass
class Tenant:
    api: StoreApi
    customer_id: int
    cc_id: int
    reward_id: int

    def fill(self, route: Route, *, account: int | None = None) -> tuple[str, Any]:
        path = route.path.format(customer=self.customer_id, cc=self.cc_id, reward=self.reward_id)
        body = route.body
        if body is not None and body.get("reward_id") == "{reward}":
            body = {"reward_id": self.reward_id}
        return f"/api/v1/accounts/{self.api.id if account is None else account}{path}", body


def make_tenant(client: TestClient, engine: Engine, store: tuple[int, str], name: str) -> Tenant:
    api = store_api(client, store)
    card_id = make_card(engine, api.id, name=f"{name} card", stamps_required=10, initial_stamps=4)
    reward_id = make_reward(engine, card_id, stamps=2)
    body = api.create_customer(
        {
            "first_name": name,
            "email": f"{name.lower()}@example.com",
            "external_references": [{"source": "square", "external_id": f"{name[0]}-1"}],
        },
        card_id=card_id,
    )
    return Tenant(api, body["id"], body["customer_cards"][0]["id"], reward_id)


@pytest.fixture
def tenants(
    client: TestClient, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> tuple[Tenant, Tenant]:
    a = make_tenant(client, engine, make_store("Store A"), "Alice")
    b = make_tenant(client, engine, make_store("Store B"), "Bea")
    return a, b


def snapshot(engine: Engine, tenant: Tenant) -> dict[str, Any]:
    """Everything of a store the routes could change, read from the database and the API."""
    store = tenant.api.id
    counts = {
        model.__name__: count(engine, model, model.store_id == store)
        for model in (
            Customer,
            ExternalReference,
            CustomerCard,
            StampLedgerEntry,
            OutboxMessage,
            IdempotentRequest,
        )
    }
    customer = tenant.api.get(f"/customers/{tenant.customer_id}")
    assert customer.status_code == 200
    return {"counts": counts, "customer": customer.json()}


def test_a_token_of_store_a_finds_nothing_of_store_b(
    client: TestClient,
    engine: Engine,
    tenants: tuple[Tenant, Tenant],
    subtests: pytest.Subtests,
) -> None:
    a, b = tenants
    before = snapshot(engine, b)
    before_a = snapshot(engine, a)
    for route in ROUTES:
        with subtests.test(route=f"{route.method} {route.path}"):
            path, body = b.fill(route)
            response = client.request(
                route.method,
                path,
                json=body,
                headers={
                    "Authorization": f"Bearer {a.api.token}",
                    "Idempotency-Key": f"matrix-{route.method}-{route.path}",
                },
            )
            assert_error(response, 404)
            assert "Bea" not in response.text
    assert snapshot(engine, b) == before
    assert snapshot(engine, a) == before_a

    # The same requests with B's own token are fine: the 404s above were about the tenant.
    for route in ROUTES:
        with subtests.test(route=f"{route.method} {route.path}", token="own"):
            path, body = b.fill(route)
            response = client.request(
                route.method, path, json=body, headers={"Authorization": f"Bearer {b.api.token}"}
            )
            assert response.status_code == route.ok, response.text


def test_store_b_ids_under_store_a_path_are_404(
    client: TestClient, engine: Engine, tenants: tuple[Tenant, Tenant], subtests: pytest.Subtests
) -> None:
    a, b = tenants
    before = snapshot(engine, b)
    before_a = snapshot(engine, a)
    for route in ROUTES:
        if not route.takes_ids():
            continue
        with subtests.test(route=f"{route.method} {route.path}"):
            path, body = b.fill(route, account=a.api.id)
            response = client.request(
                route.method, path, json=body, headers={"Authorization": f"Bearer {a.api.token}"}
            )
            assert_error(response, 404)
    # A's own customer and card with B's reward.
    response = a.api.redeem(a.customer_id, a.cc_id, b.reward_id)
    assert_error(response, 404)
    # A's customer id with B's customer card id and the other way round.
    assert_error(a.api.get(a.api.card_path(a.customer_id, b.cc_id)), 404)
    assert_error(a.api.stamp(a.customer_id, b.cc_id, 1), 404)
    assert snapshot(engine, b) == before
    assert snapshot(engine, a) == before_a


def test_reference_lookup_and_search_stay_in_the_store(tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    assert a.api.get("/customers", params={"source": "square", "external_id": "B-1"}).json() == []
    assert a.api.get("/customers", params={"search": "bea"}).json() == []
    code = b.api.get(f"/customers/{b.customer_id}").json()["customer_cards"][0]["code"]
    assert a.api.get("/customers", params={"search": code}).json() == []
    assert a.api.get("/customers", params={"search": "B-1"}).json() == []
    # B's reference can be reused by A: references are unique per store only.
    same_ref = a.api.post(
        "/customers",
        json={
            "customer": {
                "first_name": "Ann",
                "email": "bea@example.com",
                "external_references": [{"source": "square", "external_id": "B-1"}],
            }
        },
    )
    assert same_ref.status_code == 201, same_ref.text


def unauthorised_headers(engine: Engine, store_id: int, token: str) -> dict[str, dict[str, str]]:
    with session_of(engine) as s:
        _, revoked = create_token(s, store_id=store_id, name="old")
        revoke_token(s, token=revoked)
        s.commit()
    return {
        "missing": {},
        "empty": {"Authorization": ""},
        "scheme only": {"Authorization": "Bearer"},
        "basic": {"Authorization": f"Basic {token}"},
        "token scheme": {"Authorization": f"Token {token}"},
        "no scheme": {"Authorization": token},
        "wrong": {"Authorization": "Bearer lsk_" + "x" * 43},
        "not ours": {"Authorization": "Bearer sk_live_abcdef"},
        "truncated": {"Authorization": f"Bearer {token[:-1]}"},
        "too long": {"Authorization": f"Bearer {token}{'x' * 500}"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "api key header": {"X-Api-Key": token},
    }


def test_missing_or_invalid_tokens_are_401(
    client: TestClient, engine: Engine, tenants: tuple[Tenant, Tenant], subtests: pytest.Subtests
) -> None:
    _, b = tenants
    before = snapshot(engine, b)
    for label, headers in unauthorised_headers(engine, b.api.id, b.api.token).items():
        for route in ROUTES:
            with subtests.test(auth=label, route=f"{route.method} {route.path}"):
                path, body = b.fill(route)
                response = client.request(route.method, path, json=body, headers=headers)
                assert_error(response, 401)
                assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    # 401 comes first even for a store that does not exist.
    assert_error(client.get("/api/v1/accounts/987654/customers"), 401)
    assert snapshot(engine, b) == before


def test_revoking_a_token_takes_effect_at_once(
    client: TestClient, engine: Engine, tenants: tuple[Tenant, Tenant]
) -> None:
    _, b = tenants
    with session_of(engine) as s:
        _, second = create_token(s, store_id=b.api.id, name="pos")
        s.commit()
    second_api = StoreApi(client, b.api.id, second)
    assert second_api.get("/customers").status_code == 200
    assert (
        client.get(
            b.api.url("/customers"), headers={"Authorization": f"bearer {second}"}
        ).status_code
        == 200
    )  # the scheme is case-insensitive
    with session_of(engine) as s:
        revoke_token(s, token=second)
        s.commit()
    assert_error(second_api.get("/customers"), 401)
    assert b.api.get("/customers").status_code == 200  # the store's other token still works


def test_unknown_store_with_a_valid_token_is_404(tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    for account in ("987654", "0", "-1", "abc", str(2**70)):
        response = a.api.client.get(
            f"/api/v1/accounts/{account}/customers",
            headers={"Authorization": f"Bearer {a.api.token}"},
        )
        assert_error(response, 404)


def test_healthz_openapi_and_docs(client: TestClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["database"] == "ok"
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    body = spec.json()
    assert body["openapi"].startswith("3.")
    assert "/api/v1/accounts/{account_id}/customers" in body["paths"]
    assert "HTTPBearer" in body["components"]["securitySchemes"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "/openapi.json" in docs.text
