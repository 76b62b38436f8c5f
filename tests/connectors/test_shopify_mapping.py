"""Shopify mappings (GraphQL node, REST-shaped webhook body) and webhook signatures, checked
against the official samples and every Shopify vector of tests/data/vectors.json."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from connectors.errors import SkippableRecord
from connectors.shopify.mapping import map_customer, map_webhook_customer, split_tags
from connectors.shopify.webhooks import header, verify_hmac, verify_oauth_query_hmac

# A copy of ../shared/reference/vectors.json (official SDK vectors and sample payloads), kept
# in the repository so that these tests never depend on files outside it.
VECTORS_PATH = Path(__file__).resolve().parents[1] / "data" / "vectors.json"


def _load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return data


def _shopify_vectors(kind: str) -> list[Any]:
    vectors = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]
    return [
        pytest.param(v, id=v["id"])
        for v in vectors
        if v["provider"] == "shopify" and v["kind"] == kind
    ]


@pytest.fixture(scope="module")
def samples() -> dict[str, Any]:
    return dict(_load()["samples"])


# --- GraphQL node ---------------------------------------------------------------------------


def test_maps_the_documented_graphql_customer(samples: dict[str, Any]) -> None:
    node = samples["shopify_graphql_customers_query_response_excerpt"]["json"]
    record = map_customer(node)
    assert record.source == "shopify"
    assert record.external_id == "56501169"  # parsed from gid://shopify/Customer/56501169
    assert (record.first_name, record.last_name) == ("Jenny", "Test")
    assert record.email == "jennytest@b2b.example.com"
    assert record.phone == "+13125551219"
    assert record.source_updated_at == dt.datetime(2025, 4, 15, 19, 26, 33, tzinfo=dt.UTC)
    assert dict(record.attributes) == {
        "tags": [],
        "state": "disabled",
        "email_marketing_state": "not_subscribed",
        "sms_marketing_state": "not_subscribed",
        "verified_email": True,
    }
    assert record.version is None
    assert not record.deleted


def test_legacy_resource_id_wins_and_deprecated_email_phone_are_the_fallback() -> None:
    record = map_customer(
        {
            "id": "gid://shopify/Customer/1",
            "legacyResourceId": "42",
            "firstName": "  Ann ",
            "lastName": "",
            "defaultEmailAddress": None,
            "email": "ann@example.com",
            "phone": "+4915112345678",
            "note": " VIP ",
            "tags": ["gold", " ", "b2b"],
        }
    )
    assert record.external_id == "42"
    assert (record.first_name, record.last_name) == ("Ann", None)
    assert (record.email, record.phone) == ("ann@example.com", "+4915112345678")
    assert dict(record.attributes) == {"tags": ["gold", "b2b"], "note": "VIP"}


def test_absent_fields_stay_absent() -> None:
    record = map_customer({"id": "gid://shopify/Customer/7"})
    assert record.external_id == "7"
    assert (record.first_name, record.email, record.phone) == (None, None, None)
    assert record.source_updated_at is None
    assert dict(record.attributes) == {}


@pytest.mark.parametrize(
    "node",
    [{}, {"id": None}, {"id": "gid://shopify/Order/5"}, {"id": "", "legacyResourceId": "abc"}],
)
def test_a_node_without_a_usable_id_is_skippable(node: dict[str, Any]) -> None:
    with pytest.raises(SkippableRecord):
        map_customer(node)


def test_timestamps_with_different_offsets_compare_as_instants() -> None:
    a = map_customer({"id": "gid://shopify/Customer/1", "updatedAt": "2024-04-02T09:20:49-05:00"})
    b = map_customer({"id": "gid://shopify/Customer/1", "updatedAt": "2024-04-02T14:20:49Z"})
    c = map_customer({"id": "gid://shopify/Customer/1", "updatedAt": "2024-04-02T16:20:50+02:00"})
    assert a.source_updated_at == b.source_updated_at
    assert a.source_updated_at is not None
    assert c.source_updated_at is not None
    # One second later as an instant, although the wall-clock text sorts the other way round.
    assert c.source_updated_at - a.source_updated_at == dt.timedelta(seconds=1)
    d = map_customer({"id": "gid://shopify/Customer/1", "updatedAt": "2024-04-02T12:20:50-02:00"})
    assert d.source_updated_at == c.source_updated_at


# --- REST-shaped webhook body ---------------------------------------------------------------


def test_maps_the_rest_shaped_webhook_customer(samples: dict[str, Any]) -> None:
    body = samples["shopify_rest_customer_get"]["json"]["customer"]
    record = map_webhook_customer(body)
    assert record.external_id == "207119551"
    assert (record.first_name, record.last_name) == ("Bob", "Norman")
    assert record.email == "bob.norman@mail.example.com"
    assert record.phone == "+16136120707"
    assert record.source_updated_at == dt.datetime(2024, 4, 2, 14, 20, 49, tzinfo=dt.UTC)
    assert dict(record.attributes) == {
        "tags": ["Léon", "Noël"],
        "state": "disabled",
        "email_marketing_state": "not_subscribed",
        "sms_marketing_state": "not_subscribed",
        "verified_email": True,
    }


def test_webhook_and_pull_shapes_give_the_same_record(samples: dict[str, Any]) -> None:
    body = samples["shopify_rest_customer_get"]["json"]["customer"]
    node = {
        "id": body["admin_graphql_api_id"],
        "firstName": "Bob",
        "lastName": "Norman",
        "defaultEmailAddress": {"emailAddress": body["email"], "marketingState": "NOT_SUBSCRIBED"},
        "defaultPhoneNumber": {"phoneNumber": body["phone"], "marketingState": "NOT_SUBSCRIBED"},
        "tags": ["Léon", "Noël"],
        "state": "DISABLED",
        "verifiedEmail": True,
        "updatedAt": "2024-04-02T14:20:49Z",
    }
    assert map_customer(node) == map_webhook_customer(body)


def test_webhook_body_from_2025_01_without_tags_and_consent(samples: dict[str, Any]) -> None:
    body = copy.deepcopy(samples["shopify_rest_customer_get"]["json"]["customer"])
    for key in ("tags", "email_marketing_consent", "sms_marketing_consent"):
        del body[key]
    record = map_webhook_customer(body)
    assert dict(record.attributes) == {"state": "disabled", "verified_email": True}


def test_webhook_body_without_id_is_skippable() -> None:
    with pytest.raises(SkippableRecord):
        map_webhook_customer({"email": "x@example.com"})


@pytest.mark.parametrize(
    ("raw", "tags"),
    [("", []), ("a, b ,,c", ["a", "b", "c"]), (None, None), (["x", ""], ["x"])],
)
def test_split_tags(raw: object, tags: list[str] | None) -> None:
    assert split_tags(raw) == tags


# --- signatures -----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", _shopify_vectors("webhook_signature"))
def test_every_shopify_webhook_vector(vector: dict[str, Any]) -> None:
    body = vector["raw_body"].encode()
    signature = vector.get("expected_signature") or vector.get("signature_header")
    assert verify_hmac(body, signature, [vector["secret"]]) is vector["expected_valid"]
    # Secret rotation: any configured secret may match.
    assert (
        verify_hmac(body, signature, ["old-secret", vector["secret"]]) is vector["expected_valid"]
    )
    # Negative variants of each vector.
    assert not verify_hmac(body + b" ", signature, [vector["secret"]])
    assert not verify_hmac(body, signature, [vector["secret"] + "x"])
    assert not verify_hmac(body, signature, [""])
    assert not verify_hmac(body, signature, [])
    assert not verify_hmac(body, None, [vector["secret"]])
    assert not verify_hmac(body, "", [vector["secret"]])


@pytest.mark.parametrize("vector", _shopify_vectors("oauth_callback_query_hmac"))
def test_every_shopify_oauth_query_vector(vector: dict[str, Any]) -> None:
    message, digest, secret = vector["message"], vector["expected_hmac"], vector["secret"]
    assert verify_oauth_query_hmac(message, digest, secret)
    assert verify_oauth_query_hmac(message, digest.upper(), secret)
    assert not verify_oauth_query_hmac(message + "&x=1", digest, secret)
    assert not verify_oauth_query_hmac(message, digest, secret + "x")
    assert not verify_oauth_query_hmac(message, digest, "")
    assert not verify_oauth_query_hmac(message, "", secret)


def test_vectors_cover_valid_shopify_webhooks() -> None:
    vectors = [v for v in _load()["vectors"] if v["provider"] == "shopify"]
    assert sum(v["kind"] == "webhook_signature" for v in vectors) >= 3


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Shopify-Hmac-Sha256": "sig"},
        {"x-shopify-hmac-sha256": "sig"},
        {"Shopify-Hmac-Sha256": "sig"},
        {"shopify-hmac-sha256": "sig", "Content-Type": "application/json"},
    ],
)
@pytest.mark.parametrize("name", ["X-Shopify-Hmac-Sha256", "shopify-hmac-sha256", "Hmac-Sha256"])
def test_header_accepts_both_spellings_case_insensitively(
    headers: dict[str, str], name: str
) -> None:
    assert header(headers, name) == "sig"


def test_header_missing_is_none() -> None:
    assert header({"X-Shopify-Topic": "customers/update"}, "Hmac-Sha256") is None
