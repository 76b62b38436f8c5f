"""Square mapping, webhook events and signatures, against the official samples and every Square
vector of tests/data/vectors.json."""

from __future__ import annotations

import copy
import datetime as dt
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from connectors.errors import SkippableRecord
from connectors.square.mapping import map_birthday, map_customer, map_webhook_event
from connectors.square.webhooks import (
    SIGNATURE_HEADER,
    compute_signature,
    signature_header,
    verify_signature,
)

# A copy of ../shared/reference/vectors.json (official SDK vectors and sample payloads), kept
# in the repository so that these tests never depend on files outside it.
VECTORS_PATH = Path(__file__).resolve().parents[1] / "data" / "vectors.json"


@cache
def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return data


def sample(name: str) -> dict[str, Any]:
    return copy.deepcopy(reference()["samples"][name]["json"])


def square_vectors() -> list[Any]:
    vectors = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]
    square = [v for v in vectors if v["provider"] == "square"]
    return [pytest.param(v, id=v["id"]) for v in square]


# -- customers --------------------------------------------------------------------------------


def test_maps_the_list_customers_sample() -> None:
    (customer,) = sample("square_customer_list_customers_response")["customers"]
    record = map_customer(customer)
    assert record.source == "square"
    assert record.external_id == "JDKYHBWT1D4F8MFH63DBMEN8Y4"
    assert record.first_name == "Amelia"
    assert record.last_name == "Earhart"
    assert record.email == "Amelia.Earhart@example.com"
    assert record.phone == "+1-212-555-4240"  # as entered; models/ normalises
    assert record.birthday is None
    assert record.nickname is None
    assert record.company_name is None
    assert record.version == 1
    assert record.source_updated_at == dt.datetime(2016, 3, 23, 20, 21, 55, tzinfo=dt.UTC)
    assert record.deleted is False
    assert record.merged_into is None
    assert dict(record.attributes) == {
        "reference_id": "YOUR_REFERENCE_ID",
        "creation_source": "THIRD_PARTY",
        "email_unsubscribed": False,
        "group_ids": ["545AXB44B4XXWMVQ4W8SBT3HHF"],
        "note": "a customer",
    }


def test_attributes_hold_only_keys_present_and_blank_strings_are_absent() -> None:
    record = map_customer(
        {"id": " C1 ", "given_name": "  ", "nickname": "Bee", "company_name": "Acme", "note": ""}
    )
    assert record.external_id == "C1"
    assert record.first_name is None
    assert record.nickname == "Bee"
    assert record.company_name == "Acme"
    assert record.version is None
    assert record.source_updated_at is None
    assert dict(record.attributes) == {}


@pytest.mark.parametrize("payload", [{}, {"id": ""}, {"id": None}, {"id": 42}])
def test_customer_without_id_is_skippable(payload: dict[str, Any]) -> None:
    with pytest.raises(SkippableRecord):
        map_customer(payload)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1962-03-04", "1962-03-04"),
        ("0000-03-04", "--03-04"),
        ("0000-02-29", "--02-29"),
        ("0000-12-31", "--12-31"),
        ("1998-09-21T00:00:00-00:00", "1998-09-21"),
        ("1999-02-29", None),
        ("0000-13-01", None),
        ("0000-00-10", None),
        ("03-04", None),
        ("not a date", None),
        ("", None),
        (None, None),
        (19620304, None),
    ],
)
def test_birthdays(raw: Any, expected: str | None) -> None:
    assert map_birthday(raw) == expected
    assert map_customer({"id": "C", "birthday": raw}).birthday == expected


def test_version_must_be_an_integer() -> None:
    assert map_customer({"id": "C", "version": 7}).version == 7
    assert map_customer({"id": "C", "version": "8"}).version == 8
    assert map_customer({"id": "C", "version": True}).version is None
    assert map_customer({"id": "C", "version": "x"}).version is None


# -- webhook events ---------------------------------------------------------------------------


def test_customer_created_event() -> None:
    record = map_webhook_event(sample("square_webhook_customer_created"))
    assert record.external_id == "QPTXM8PQNX3Q726ZYHPMNP46XC"
    assert (record.first_name, record.last_name) == ("Jenkins", "Smorly")
    assert record.birthday == "1962-03-04"
    assert record.version == 0
    assert record.deleted is False
    assert record.attributes["creation_source"] == "DIRECTORY"
    assert "merged_from" not in record.attributes


def test_customer_updated_event() -> None:
    record = map_webhook_event(sample("square_webhook_customer_updated"))
    assert record.external_id == "A0AP25A6SCVTH8JES9BX01GXM4"
    assert record.phone == "+13477947111"
    assert record.version == 1
    assert record.source_updated_at == dt.datetime(2022, 11, 9, 21, 38, 30, tzinfo=dt.UTC)


def test_customer_deleted_event_is_a_tombstone() -> None:
    record = map_webhook_event(sample("square_webhook_customer_deleted"))
    assert record.external_id == "QPTXM8PQNX3Q726ZYHPMNP46XC"
    assert record.deleted is True
    assert record.merged_into is None
    assert record.version == 3
    # The deleted profile has no updated_at: the event's time stands in.
    assert record.source_updated_at == dt.datetime(2022, 11, 9, 21, 26, 50, tzinfo=dt.UTC)


def test_deleted_by_merge_names_the_surviving_profile() -> None:
    event = sample("square_webhook_customer_deleted")
    event["data"]["object"]["event_context"] = {
        "merge": {
            "from_customer_ids": ["QPTXM8PQNX3Q726ZYHPMNP46XC", "OTHER"],
            "to_customer_id": "NEWPROFILE",
        }
    }
    record = map_webhook_event(event)
    assert record.deleted is True
    assert record.merged_into == "NEWPROFILE"


def test_created_by_merge_lists_the_merged_profiles() -> None:
    event = sample("square_webhook_customer_created")
    event["data"]["object"]["customer"]["creation_source"] = "MERGE"
    event["data"]["object"]["event_context"] = {
        "merge": {
            "from_customer_ids": ["OLD1", "OLD2"],
            "to_customer_id": "QPTXM8PQNX3Q726ZYHPMNP46XC",
        }
    }
    record = map_webhook_event(event)
    assert record.deleted is False
    assert record.merged_into is None
    assert record.attributes["merged_from"] == ["OLD1", "OLD2"]
    assert record.attributes["creation_source"] == "MERGE"


def test_deleted_event_without_customer_object_uses_data_id() -> None:
    event = {
        "type": "customer.deleted",
        "created_at": "2022-11-09T21:26:50Z",
        "data": {"type": "customer", "id": "GONE", "deleted": True, "object": {}},
    }
    record = map_webhook_event(event)
    assert (record.external_id, record.deleted) == ("GONE", True)


def test_non_customer_events_are_skippable() -> None:
    with pytest.raises(SkippableRecord):
        map_webhook_event(sample("square_webhook_payment_updated"))
    with pytest.raises(SkippableRecord):
        map_webhook_event({"type": "customer.updated"})


# -- signatures -------------------------------------------------------------------------------


def test_every_square_vector_is_present() -> None:
    vectors = [v for v in reference()["vectors"] if v["provider"] == "square"]
    assert sum(v["expected_valid"] for v in vectors) == 2
    assert sum(not v["expected_valid"] for v in vectors) == 4


@pytest.mark.parametrize("vector", square_vectors())
def test_square_signature_vectors(vector: dict[str, Any]) -> None:
    header = vector.get("signature_header") or vector["expected_signature"]
    raw = vector["raw_body"].encode("utf-8")
    valid = verify_signature(
        raw,
        header,
        signature_key=vector["signature_key"],
        notification_url=vector["notification_url"],
    )
    assert valid is vector["expected_valid"]
    computed = compute_signature(
        raw, signature_key=vector["signature_key"], notification_url=vector["notification_url"]
    )
    assert computed == vector["computed_signature"]


def test_signature_edge_cases() -> None:
    raw = b'{"data":{"type":"webhooks","id":">id<"}}'
    url = "https://webhook.site/webhooks"
    good = compute_signature(raw, signature_key="signature-key", notification_url=url)
    assert verify_signature(raw, good, signature_key="signature-key", notification_url=url)
    assert not verify_signature(raw, None, signature_key="signature-key", notification_url=url)
    assert not verify_signature(raw, "", signature_key="signature-key", notification_url=url)
    assert not verify_signature(raw, "%%%", signature_key="signature-key", notification_url=url)
    assert not verify_signature(b"", good, signature_key="signature-key", notification_url=url)
    # An empty key or URL means "disabled": nothing verifies, not even a matching signature.
    empty_key = compute_signature(raw, signature_key="", notification_url=url)
    assert not verify_signature(raw, empty_key, signature_key="", notification_url=url)
    empty_url = compute_signature(raw, signature_key="signature-key", notification_url="")
    assert not verify_signature(raw, empty_url, signature_key="signature-key", notification_url="")
    # A re-serialised body never verifies.
    pretty = json.dumps(json.loads(raw), indent=2).encode()
    assert not verify_signature(pretty, good, signature_key="signature-key", notification_url=url)


def test_signature_header_lookup_is_case_insensitive() -> None:
    assert signature_header({"X-Square-HmacSha256-Signature": "abc"}) == "abc"
    assert signature_header({SIGNATURE_HEADER: "abc"}) == "abc"
    assert signature_header([("X-SQUARE-HMACSHA256-SIGNATURE", "abc")]) == "abc"
    assert signature_header({"x-square-signature": "sha1"}) is None
    assert signature_header({}) is None
