"""Fuzzing the REST API: no request, however odd, may produce a 5xx.

- A schemathesis run over the app's own OpenAPI spec (positive and negative generation), with the
  path's `account_id` pinned to a real store, a valid token on almost every request, and customer,
  customer-card and reward ids that are sometimes real (ours or another store's).
- Hypothesis properties sending arbitrary JSON values for every customer field and for the
  stamp/redeem bodies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from sqlalchemy import Engine

from tests.api_helpers import (
    StoreApi,
    make_card,
    make_reward,
    store_api,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


# Bounded so that the whole module stays well under a minute on both databases.
EXAMPLES_PER_OPERATION = 20
PROPERTY_EXAMPLES = 60


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints the request
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class World:
    api: StoreApi
    customer_ids: list[int]
    cc_ids: list[int]
    reward_ids: list[int]


@pytest.fixture
def world(client: TestClient, engine: Engine, make_store: Callable[..., tuple[int, str]]) -> World:
    """Our store with enrolled customers, plus another store whose ids must stay invisible."""
    ours, theirs = store_api(client, make_store()), store_api(client, make_store())
    customer_ids, cc_ids, reward_ids = [], [], []
    for i, api in enumerate((ours, theirs)):
        card = make_card(engine, api.id, stamps_required=5, initial_stamps=2)
        reward_ids.append(make_reward(engine, card, stamps=2))
        make_card(engine, api.id, name="Archived", archived=True)
        body = api.create_customer(
            {
                "first_name": f"Fuzz{i}",
                "email": f"fuzz{i}@example.com",
                "external_references": [{"source": "square", "external_id": f"SQ{i}"}],
            },
            card_id=card,
        )
        customer_ids.append(body["id"])
        cc_ids.append(body["customer_cards"][0]["id"])
    return World(ours, customer_ids, cc_ids, reward_ids)


def id_strategy(real: list[int]) -> st.SearchStrategy[int | None]:
    """A real id (often), or None to keep what schemathesis generated."""
    return st.one_of(st.sampled_from(real), st.none())


def test_openapi_schema_fuzz_has_no_server_errors(
    client: TestClient, world: World, subtests: pytest.Subtests
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    token = world.api.token
    calls: list[int] = []

    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if any(True for _ in operation.iter_parameters()) or operation.body:
            modes.append(GenerationMode.NEGATIVE)  # /healthz has nothing to break
        for mode in modes:
            with subtests.test(operation=f"{operation.method.upper()} {operation.path}", mode=mode):

                @fuzz_settings(EXAMPLES_PER_OPERATION)
                @given(
                    case=operation.as_strategy(generation_mode=mode),
                    customer_id=id_strategy(world.customer_ids),
                    card_id=id_strategy(world.cc_ids),
                    reward_id=id_strategy(world.reward_ids),
                    authorised=st.integers(0, 9).map(lambda n: n > 0),
                )
                def run(
                    case: schemathesis.Case,
                    customer_id: int | None,
                    card_id: int | None,
                    reward_id: int | None,
                    authorised: bool,
                ) -> None:
                    params = case.path_parameters
                    if params is not None:
                        if "account_id" in params:
                            params["account_id"] = world.api.id
                        if "customer_id" in params and customer_id is not None:
                            params["customer_id"] = customer_id
                        if "card_id" in params and card_id is not None:
                            params["card_id"] = card_id
                    body = case.body
                    if reward_id is not None and isinstance(body, dict) and "reward_id" in body:
                        body["reward_id"] = reward_id
                    headers = {"Authorization": f"Bearer {token}"} if authorised else None
                    response = case.call(headers=headers)
                    calls.append(response.status_code)
                    assert response.status_code < 500, (
                        f"{case.method} {case.formatted_path} query={case.query} "
                        f"headers={case.headers} body={case.body!r} → "
                        f"{response.status_code} {response.text[:500]}"
                    )
                    case.validate_response(response, checks=[not_a_server_error])

                run()
    # The run reached the handlers, not just the auth/validation layers.
    assert any(200 <= status < 300 for status in calls)
    assert 401 in calls
    assert 404 in calls
    assert 422 in calls


# --- properties: arbitrary JSON in every field ---------------------------------------------------

ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "null",
        "0000-05-01",
        "--02-29",
        "--02-30",
        "2023-02-29",
        "+1 (212) 555-4240",
        "+12125554240",
        "ANN@EXAMPLE.COM",
        "x" * 300,
        "9" * 40,
        "1e999",
        "square",
        "Square POS",
        "%",
        "_",
        "\\",
        "😀",
        "\u202e",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**80),
    st.floats(),  # includes NaN and ±Infinity, sent as JSON's non-standard tokens
    st.text(max_size=40),
    ODD_STRINGS,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), ODD_STRINGS), children, max_size=4),
    ),
    max_leaves=12,
)
REFERENCES = st.one_of(
    JSON_VALUES,
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "source": st.one_of(st.sampled_from(["square", "shopify", "my_pos"]), JSON_VALUES),
                "external_id": st.one_of(st.sampled_from(["SQ0", "SQ1", "1"]), JSON_VALUES),
                "metadata": JSON_VALUES,
            },
        ),
        max_size=3,
    ),
)
CUSTOMER_FIELDS = dict.fromkeys(
    ("first_name", "last_name", "email", "phone", "birthday", "metadata"), JSON_VALUES
)
CUSTOMERS = st.one_of(
    st.fixed_dictionaries({}, optional={**CUSTOMER_FIELDS, "external_references": REFERENCES}),
    JSON_VALUES,
)


def send(api: StoreApi, method: str, path: str, body: Any, **headers: str) -> int:
    response = api.request(
        method,
        path,
        content=json.dumps(body, allow_nan=True).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    assert response.status_code < 500, (method, path, body, response.text)
    if response.status_code < 300:
        assert isinstance(response.json(), dict)
    else:
        assert set(response.json()) & {"error", "errors"}
    return response.status_code


def test_arbitrary_customer_fields_never_5xx(world: World) -> None:
    api = world.api

    @fuzz_settings(PROPERTY_EXAMPLES)
    @given(
        customer=CUSTOMERS,
        card_id=st.one_of(st.sampled_from([None, *world.reward_ids]), JSON_VALUES),
        send_card_links=JSON_VALUES,
        update=CUSTOMERS,
        key=st.one_of(
            st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
        ),
    )
    def run(
        customer: Any, card_id: Any, send_card_links: Any, update: Any, key: str | None
    ) -> None:
        body: dict[str, Any] = {"customer": customer}
        if card_id is not None:
            body["card_id"] = card_id
        if send_card_links is not None:
            body["send_card_links"] = send_card_links
        headers = {"Idempotency-Key": key} if key else {}
        send(api, "POST", "/customers", body, **headers)
        for customer_id in world.customer_ids:  # ours, then another store's
            for method in ("PATCH", "PUT"):
                send(api, method, f"/customers/{customer_id}", {"customer": update})

    run()


def test_arbitrary_stamp_and_redeem_bodies_never_5xx(world: World) -> None:
    api = world.api
    customer_id, cc_id = world.customer_ids[0], world.cc_ids[0]

    @fuzz_settings(PROPERTY_EXAMPLES)
    @given(
        stamp=st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "stamps": st.one_of(st.integers(-5, 1005), JSON_VALUES),
                    "skip_notifications": JSON_VALUES,
                },
            ),
            JSON_VALUES,
        ),
        redeem=st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "reward_id": st.one_of(st.sampled_from(world.reward_ids), JSON_VALUES),
                    "skip_notifications": JSON_VALUES,
                },
            ),
            JSON_VALUES,
        ),
    )
    def run(stamp: Any, redeem: Any) -> None:
        send(api, "POST", api.card_path(customer_id, cc_id, "stamp"), stamp)
        send(api, "POST", api.card_path(customer_id, cc_id, "redeem"), redeem)

    run()
    shown = api.get(api.card_path(customer_id, cc_id)).json()
    assert shown["stamps"] >= 0
