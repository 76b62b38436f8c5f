"""Customers over HTTP (seed 000): create/upsert, validation, search, pagination, show, update."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine

from models import customers as customer_ops
from models.customers import CustomerFields, ReferenceInput
from tests.api_helpers import (
    CUSTOMER_CARD_KEYS,
    CUSTOMER_KEYS,
    OPTIONAL_CUSTOMER_KEYS,
    PASS_URL,
    StoreApi,
    assert_error,
    assert_invalid,
    customers_count,
    ledger,
    links,
    make_card,
    outbox,
    references_count,
    session_of,
    store_api,
)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


@pytest.fixture
def api(client: TestClient, make_store: Callable[..., tuple[int, str]]) -> StoreApi:
    return store_api(client, make_store())


def assert_customer_shape(body: dict[str, Any]) -> None:
    assert CUSTOMER_KEYS <= set(body) <= CUSTOMER_KEYS | OPTIONAL_CUSTOMER_KEYS, sorted(body)
    assert isinstance(body["metadata"], dict)
    assert isinstance(body["external_references"], list)
    assert isinstance(body["customer_cards"], list)
    for cc in body["customer_cards"]:
        assert set(cc) == CUSTOMER_CARD_KEYS, sorted(cc)


# --- create ---------------------------------------------------------------------------------------


def test_create_returns_the_normalised_customer(api: StoreApi) -> None:
    response = api.post(
        "/customers",
        json={
            "customer": {
                "first_name": "  Ada ",
                "last_name": "Lovelace",
                "email": "Ada.Lovelace@Example.COM",
                "phone": "+1 (212) 555-4240",
                "birthday": "1990-12-10",
                "metadata": {"drink": "flat white", "tags": ["vip"]},
                "external_references": [
                    {"source": "square", "external_id": "SQ-1", "metadata": {"v": 1}}
                ],
            }
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert_customer_shape(body)
    assert isinstance(body["id"], int)
    assert body["first_name"] == "Ada"
    assert body["last_name"] == "Lovelace"
    assert body["email"] == "ada.lovelace@example.com"
    assert body["phone"] == "+12125554240"
    assert body["birthday"] == "1990-12-10"
    assert body["metadata"] == {"drink": "flat white", "tags": ["vip"]}
    [ref] = body["external_references"]
    assert (ref["source"], ref["external_id"], ref["metadata"]) == ("square", "SQ-1", {"v": 1})
    assert body["customer_cards"] == []
    assert body["created_at"]
    assert body["updated_at"]
    # What the create answered is what show answers.
    shown = api.get(f"/customers/{body['id']}")
    assert shown.status_code == 200
    assert shown.json() == body


def test_phone_is_stored_in_e164(api: StoreApi, subtests: pytest.Subtests) -> None:
    for i, (phone, expected) in enumerate(
        [
            ("+12125554240", "+12125554240"),
            ("(212) 555-4241", "+12125554241"),  # national, read in the store's region (US)
            ("212.555.4242", "+12125554242"),
            ("+44 20 7946 0958", "+442079460958"),
        ]
    ):
        with subtests.test(phone=phone):
            body = api.create_customer({"first_name": f"P{i}", "phone": phone})
            assert body["phone"] == expected
            assert body["email"] is None


def test_birthday_round_trip(api: StoreApi, subtests: pytest.Subtests) -> None:
    for i, (sent, shown) in enumerate(
        [
            ("--05-01", "--05-01"),
            ("0000-05-01", "--05-01"),  # Square's year-less form
            ("--02-29", "--02-29"),  # a year-less leap day is a real birthday
            ("1984-02-29", "1984-02-29"),
            (" 1970-01-31 ", "1970-01-31"),
        ]
    ):
        with subtests.test(birthday=sent):
            body = api.create_customer(
                {"first_name": "B", "email": f"b{i}@example.com", "birthday": sent}
            )
            assert body["birthday"] == shown
            assert api.get(f"/customers/{body['id']}").json()["birthday"] == shown


def test_impossible_birthdays_are_rejected(
    api: StoreApi, engine: Engine, subtests: pytest.Subtests
) -> None:
    for birthday in [
        "2023-02-29",
        "--02-30",
        "--13-01",
        "1990-00-10",
        "05-01",
        "1990/01/01",
        "tomorrow",
        "3000-01-01",
        "1800-01-01",
    ]:
        with subtests.test(birthday=birthday):
            response = api.post(
                "/customers",
                json={
                    "customer": {"first_name": "B", "email": "b@example.com", "birthday": birthday}
                },
            )
            assert_invalid(response, "birthday")
    assert customers_count(engine, api.id) == 0


def test_create_with_card_id_enrols_with_wallet_urls_and_welcome_bonus(
    api: StoreApi, engine: Engine
) -> None:
    card_id = make_card(engine, api.id, name="Coffee", stamps_required=8, initial_stamps=2)
    body = api.create_customer({"first_name": "E", "email": "e@example.com"}, card_id=card_id)
    assert_customer_shape(body)
    [cc] = body["customer_cards"]
    assert set(cc) == CUSTOMER_CARD_KEYS
    assert cc["card_id"] == card_id
    assert cc["card_name"] == "Coffee"
    assert cc["stamps"] == 2
    assert cc["stamps_required"] == 8
    assert cc["status"] == "active"
    assert cc["wallet_pass_installed"] is False
    assert isinstance(cc["code"], str)
    assert cc["code"].isdigit()
    apple, google = PASS_URL.match(cc["apple_wallet_url"]), PASS_URL.match(cc["google_wallet_url"])
    assert apple
    assert google
    assert apple.group(2) == "apple"
    assert google.group(2) == "google"
    assert apple.group(1) == google.group(1)  # one pass token, two wallets
    entries = ledger(engine, cc["id"])
    assert [(e.reason, e.delta) for e in entries] == [("welcome_bonus", 2)]
    # Without initial stamps: no ledger entry at all.
    plain = make_card(engine, api.id, name="Tea", stamps_required=5)
    other = api.create_customer({"first_name": "F", "email": "f@example.com"}, card_id=plain)
    assert other["customer_cards"][0]["stamps"] == 0
    assert ledger(engine, other["customer_cards"][0]["id"]) == []
    # Codes and pass tokens differ between cards.
    assert other["customer_cards"][0]["code"] != cc["code"]
    assert other["customer_cards"][0]["apple_wallet_url"] != cc["apple_wallet_url"]


def test_send_card_links_forms(api: StoreApi, engine: Engine, subtests: pytest.Subtests) -> None:
    card_id = make_card(engine, api.id)
    flags: list[tuple[object, bool]] = [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
    ]
    for i, (flag, queued) in enumerate(flags):
        with subtests.test(send_card_links=flag):
            before = {m.id for m in outbox(engine, api.id, "card_links")}
            body = api.create_customer(
                {"first_name": "L", "email": f"l{i}@example.com", "phone": f"+1212555010{i}"},
                card_id=card_id,
                send_card_links=flag,
            )
            rows = [m for m in outbox(engine, api.id, "card_links") if m.id not in before]
            if not queued:
                assert rows == []
                continue
            [row] = rows
            cc = body["customer_cards"][0]
            assert row.payload["customer_id"] == body["id"]
            assert row.payload["customer_card_id"] == cc["id"]
            assert row.payload["apple_wallet_url"] == cc["apple_wallet_url"]
            assert row.payload["google_wallet_url"] == cc["google_wallet_url"]
            assert sorted(row.payload["channels"]) == ["email", "sms"]
            assert row.status == "pending"
    assert len(outbox(engine, api.id, "card_links")) == 4


def test_send_card_links_is_off_by_default_and_rejects_garbage(
    api: StoreApi, engine: Engine
) -> None:
    card_id = make_card(engine, api.id)
    api.create_customer({"first_name": "L", "email": "l@example.com"}, card_id=card_id)
    assert outbox(engine, api.id, "card_links") == []
    response = api.post(
        "/customers",
        json={
            "customer": {"first_name": "M", "email": "m@example.com"},
            "card_id": card_id,
            "send_card_links": "maybe",
        },
    )
    assert_invalid(response, "send_card_links")
    assert customers_count(engine, api.id) == 1


def test_create_with_existing_references_updates_that_customer(
    api: StoreApi, engine: Engine
) -> None:
    first = api.create_customer(
        {
            "first_name": "Sam",
            "email": "sam@example.com",
            "metadata": {"a": 1, "b": 2},
            "external_references": [
                {"source": "square", "external_id": "SQ-9", "metadata": {"x": 1, "y": 2}}
            ],
        }
    )
    again = api.post(
        "/customers",
        json={
            "customer": {
                "first_name": "Samuel",
                "phone": "+12125550199",
                "metadata": {"b": 3},
                "external_references": [
                    {"source": "square", "external_id": "SQ-9", "metadata": {"y": 5, "z": 6}},
                    {"source": "shopify", "external_id": "777"},
                ],
            }
        },
    )
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["id"] == first["id"]
    assert body["first_name"] == "Samuel"
    assert body["email"] == "sam@example.com"  # not sent: kept
    assert body["phone"] == "+12125550199"
    assert body["metadata"] == {"a": 1, "b": 3}
    refs = {(r["source"], r["external_id"]): r["metadata"] for r in body["external_references"]}
    assert refs == {("square", "SQ-9"): {"x": 1, "y": 5, "z": 6}, ("shopify", "777"): {}}
    assert customers_count(engine, api.id) == 1
    assert references_count(engine, api.id) == 2
    # "Safe to call with the same references twice": an identical repeat is a no-op upsert.
    repeat = api.post(
        "/customers",
        json={"customer": {"external_references": [{"source": "shopify", "external_id": 777}]}},
    )
    assert repeat.status_code == 200, repeat.text
    assert repeat.json()["id"] == first["id"]
    assert customers_count(engine, api.id) == 1
    assert references_count(engine, api.id) == 2


def test_references_of_two_customers_conflict(api: StoreApi, engine: Engine) -> None:
    one = api.create_customer(
        {
            "first_name": "One",
            "email": "one@example.com",
            "external_references": [{"source": "square", "external_id": "A"}],
        }
    )
    two = api.create_customer(
        {
            "first_name": "Two",
            "email": "two@example.com",
            "external_references": [{"source": "shopify", "external_id": "B"}],
        }
    )
    response = api.post(
        "/customers",
        json={
            "customer": {
                "first_name": "Both",
                "email": "both@example.com",
                "external_references": [
                    {"source": "square", "external_id": "A"},
                    {"source": "shopify", "external_id": "B"},
                ],
            }
        },
    )
    errors = assert_invalid(response, "external_references")
    assert any(str(one["id"]) in m and str(two["id"]) in m for m in errors["external_references"])
    assert customers_count(engine, api.id) == 2
    assert api.get(f"/customers/{one['id']}").json() == one
    assert api.get(f"/customers/{two['id']}").json() == two
    # The same conflict through an update of customer one.
    response = api.patch(
        f"/customers/{one['id']}",
        json={"customer": {"external_references": [{"source": "shopify", "external_id": "B"}]}},
    )
    assert_invalid(response, "external_references")
    assert api.get(f"/customers/{one['id']}").json() == one


VALIDATION_CASES: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"email": "x@example.com"}, {}, "first_name"),
    ({"first_name": "", "email": "x@example.com"}, {}, "first_name"),
    ({"first_name": "   ", "email": "x@example.com"}, {}, "first_name"),
    ({"first_name": 5, "email": "x@example.com"}, {}, "first_name"),
    ({"first_name": "x" * 201, "email": "x@example.com"}, {}, "first_name"),
    ({"first_name": "X", "last_name": "y" * 201, "email": "x@example.com"}, {}, "last_name"),
    ({"first_name": "X", "email": "not-an-email"}, {}, "email"),
    ({"first_name": "X", "email": "a@b@example.com"}, {}, "email"),
    ({"first_name": "X", "phone": "12"}, {}, "phone"),
    ({"first_name": "X", "phone": "call me"}, {}, "phone"),
    ({"first_name": "X", "phone": "+1 555 000 0000"}, {}, "phone"),
    ({"first_name": "X", "email": "x@example.com", "birthday": "1990-13-01"}, {}, "birthday"),
    ({"first_name": "X", "email": "x@example.com", "birthday": 19900101}, {}, "birthday"),
    ({"first_name": "X", "email": "x@example.com", "metadata": "x"}, {}, "metadata"),
    ({"first_name": "X", "email": "x@example.com", "metadata": [1, 2]}, {}, "metadata"),
    (
        {"first_name": "X", "email": "x@example.com", "metadata": {"k": "v" * 20_000}},
        {},
        "metadata",
    ),
    (
        {"first_name": "X", "email": "x@example.com", "external_references": "square"},
        {},
        "external_references",
    ),
    (
        {
            "first_name": "X",
            "email": "x@example.com",
            "external_references": [{"source": "Square POS", "external_id": "1"}],
        },
        {},
        "external_references",
    ),
    (
        {
            "first_name": "X",
            "email": "x@example.com",
            "external_references": [{"source": "square", "external_id": ""}],
        },
        {},
        "external_references",
    ),
    (
        {
            "first_name": "X",
            "email": "x@example.com",
            "external_references": [{"source": "square"}],
        },
        {},
        "external_references",
    ),
    (
        {
            "first_name": "X",
            "email": "x@example.com",
            "external_references": [{"source": "square", "external_id": "1", "metadata": "meta"}],
        },
        {},
        "external_references",
    ),
    ({"first_name": "X", "email": "x@example.com"}, {"card_id": 987654}, "card_id"),
    ({"first_name": "X", "email": "x@example.com"}, {"card_id": "abc"}, "card_id"),
    ({"first_name": "X", "email": "x@example.com"}, {"card_id": True}, "card_id"),
    ({"first_name": "X", "email": "x@example.com"}, {"card_id": 2**70}, "card_id"),
    ({"first_name": "X"}, {}, "base"),
    ({"first_name": "X", "email": "", "phone": None}, {}, "base"),
]


def test_create_validation_names_the_field(
    api: StoreApi, engine: Engine, subtests: pytest.Subtests
) -> None:
    for customer, extra, field in VALIDATION_CASES:
        with subtests.test(field=field, customer=customer, extra=extra):
            response = api.post("/customers", json={"customer": customer, **extra})
            assert_invalid(response, field)
    assert customers_count(engine, api.id) == 0


def test_enrolment_card_must_be_of_this_store_and_live(
    api: StoreApi, engine: Engine, make_store: Callable[..., tuple[int, str]]
) -> None:
    other_store, _ = make_store()
    foreign = make_card(engine, other_store)
    archived = make_card(engine, api.id, archived=True)
    for card_id in (foreign, archived):
        response = api.post(
            "/customers",
            json={"customer": {"first_name": "X", "email": "x@example.com"}, "card_id": card_id},
        )
        assert_invalid(response, "card_id")
    assert customers_count(engine, api.id) == 0


def test_email_and_phone_are_unique_per_store(
    api: StoreApi, engine: Engine, make_store: Callable[..., tuple[int, str]], client: TestClient
) -> None:
    api.create_customer({"first_name": "U", "email": "u@example.com", "phone": "+12125550111"})
    response = api.post(
        "/customers", json={"customer": {"first_name": "V", "email": "U@Example.com"}}
    )
    assert_invalid(response, "email")
    response = api.post(
        "/customers", json={"customer": {"first_name": "V", "phone": "(212) 555-0111"}}
    )
    assert_invalid(response, "phone")
    assert customers_count(engine, api.id) == 1
    # Another store may hold the same email and phone.
    other = store_api(client, make_store())
    other.create_customer({"first_name": "U", "email": "u@example.com", "phone": "+12125550111"})


def test_malformed_json_is_a_400_with_a_message(
    api: StoreApi, engine: Engine, subtests: pytest.Subtests
) -> None:
    for body in [
        b'{"customer": ',
        b'{"customer": {"first_name": "A",}}',
        b"not json at all",
        b"\xff\xfe\x00",
        b'{"customer": {"first_name": "A"}} trailing',
    ]:
        with subtests.test(body=body):
            response = api.post(
                "/customers", content=body, headers={"Content-Type": "application/json"}
            )
            assert_error(response, 400)
    assert customers_count(engine, api.id) == 0


WRONG_TYPES: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b'"customer"',
    b"42",
    b'{"customer": [{"first_name": "A"}]}',
    b'{"customer": "A"}',
    b'{"customer": null}',
    b'{"customer": {"first_name": ["A"], "email": "a@example.com"}}',
    b'{"customer": {"first_name": "A", "email": {"x": 1}}}',
    b'{"customer": {"first_name": "A", "email": "a@example.com", "metadata": "{}"}}',
    b'{"customer": {"first_name": "A", "email": "a@example.com", "metadata": {"n": NaN}}}',
    b'{"customer": {"first_name": "A", "email": "a@example.com", "metadata": {"n": 1e999}}}',
]


def test_wrong_json_types_are_422(api: StoreApi, engine: Engine, subtests: pytest.Subtests) -> None:
    for body in WRONG_TYPES:
        with subtests.test(body=body):
            response = api.post(
                "/customers", content=body, headers={"Content-Type": "application/json"}
            )
            assert_invalid(response)
    assert customers_count(engine, api.id) == 0


def test_text_the_database_cannot_store_is_a_422(api: StoreApi, engine: Engine) -> None:
    for customer, field in [
        ({"first_name": "A\x00B", "email": "a@example.com"}, "first_name"),
        ({"first_name": "A", "email": "a@example.com", "metadata": {"k\x00": 1}}, "metadata"),
        ({"first_name": "A", "email": "a@example.com", "metadata": {"k": ["\x00"]}}, "metadata"),
        (
            {
                "first_name": "A",
                "email": "a@example.com",
                "external_references": [{"source": "square", "external_id": "1\x002"}],
            },
            "external_references",
        ),
    ]:
        assert_invalid(api.post("/customers", json={"customer": customer}), field)
    # A lone surrogate is valid JSON but not Unicode text.
    raw = b'{"customer": {"first_name": "\\ud800", "email": "a@example.com"}}'
    response = api.post("/customers", content=raw, headers={"Content-Type": "application/json"})
    assert_invalid(response, "first_name")
    deep: Any = {}
    for _ in range(100):
        deep = {"d": deep}
    body = {"customer": {"first_name": "A", "email": "a@example.com", "metadata": deep}}
    assert_invalid(api.post("/customers", json=body), "metadata")
    assert customers_count(engine, api.id) == 0


# --- list / search / pagination ------------------------------------------------------------------


@pytest.fixture
def people(api: StoreApi, engine: Engine) -> dict[str, dict[str, Any]]:
    card_id = make_card(engine, api.id)
    specs = {
        "anna": {
            "first_name": "Anna",
            "last_name": "Smith",
            "email": "anna.smith@example.com",
            "phone": "+12125554240",
            "external_references": [{"source": "square", "external_id": "SQCUST1"}],
        },
        "joanne": {
            "first_name": "Joanne",
            "last_name": "Brown",
            "email": "jb@example.org",
            "external_references": [{"source": "shopify", "external_id": "987654321"}],
        },
        "bob": {"first_name": "Bob", "last_name": "Annex", "phone": "+447911123456"},
        "carl": {"first_name": "Carl", "email": "carl@example.net"},
    }
    out = {}
    for key, spec in specs.items():
        out[key] = api.create_customer(spec, card_id=card_id)
    return out


def ids_of(response: Any) -> set[int]:
    assert response.status_code == 200, response.text
    return {c["id"] for c in response.json()}


SEARCHES: list[tuple[str, set[str]]] = [
    ("ann", {"anna", "joanne", "bob"}),  # first name, last name ("Annex"), inside "Joanne"
    ("ANN", {"anna", "joanne", "bob"}),
    ("anna smith", {"anna"}),
    ("Anna Smith", {"anna"}),
    ("smith", {"anna"}),
    ("anna.smith@example.com", {"anna"}),
    ("@example.org", {"joanne"}),
    ("EXAMPLE.NET", {"carl"}),
    ("2125554240", {"anna"}),
    ("(212) 555-4240", {"anna"}),
    ("555-4240", {"anna"}),
    ("+44 7911 123456", {"bob"}),
    ("SQCUST1", {"anna"}),
    ("987654321", {"joanne"}),
    ("SQCUST", set()),  # external ids match exactly
    ("zzz", set()),
    ("100%", set()),  # LIKE wildcards are literal
    ("_", set()),
]


def test_search(
    api: StoreApi, people: dict[str, dict[str, Any]], subtests: pytest.Subtests
) -> None:
    for search, expected in SEARCHES:
        with subtests.test(search=search):
            response = api.get("/customers", params={"search": search})
            assert ids_of(response) == {people[k]["id"] for k in expected}
            assert response.headers["Total-Count"] == str(len(expected))
            for body in response.json():
                assert set(body) >= CUSTOMER_KEYS


def test_search_by_exact_card_code(api: StoreApi, people: dict[str, dict[str, Any]]) -> None:
    code = people["carl"]["customer_cards"][0]["code"]
    assert ids_of(api.get("/customers", params={"search": code})) == {people["carl"]["id"]}
    # 12 of 13 digits: longer than any phone's digits, and codes only match exactly.
    assert ids_of(api.get("/customers", params={"search": code[:-1]})) == set()


def test_empty_search_lists_everyone(api: StoreApi, people: dict[str, dict[str, Any]]) -> None:
    everyone = {c["id"] for c in people.values()}
    assert ids_of(api.get("/customers")) == everyone
    assert ids_of(api.get("/customers", params={"search": "  "})) == everyone


def test_reference_lookup(api: StoreApi, people: dict[str, dict[str, Any]]) -> None:
    response = api.get("/customers", params={"source": "square", "external_id": "SQCUST1"})
    assert response.status_code == 200
    [found] = response.json()
    assert found == api.get(f"/customers/{people['anna']['id']}").json()
    assert response.headers["Total-Count"] == "1"
    assert ids_of(
        api.get("/customers", params={"source": "shopify", "external_id": "SQCUST1"})
    ) == (set())
    assert ids_of(api.get("/customers", params={"source": "square", "external_id": "sqcust1"})) == (
        set()
    )
    assert_invalid(api.get("/customers", params={"source": "square"}))
    assert_invalid(api.get("/customers", params={"external_id": "SQCUST1"}))


@pytest.fixture
def many(api: StoreApi, engine: Engine) -> list[int]:
    """45 customers, created through the store (the API's create is tested above)."""
    with session_of(engine) as s:
        ids = []
        for i in range(45):
            result = customer_ops.create_customer(
                s,
                store_id=api.id,
                fields=CustomerFields(first_name=f"Many{i:02d}", email=f"many{i}@example.com"),
                references=[ReferenceInput(source="legacy", external_id=f"L{i}")],
            )
            ids.append(result.customer.id)
        s.commit()
    return ids


def test_pagination_headers_and_links(api: StoreApi, client: TestClient, many: list[int]) -> None:
    response = api.get("/customers")
    assert response.status_code == 200
    assert len(response.json()) == 20
    assert response.headers["Current-Page"] == "1"
    assert response.headers["Page-Items"] == "20"
    assert response.headers["Total-Pages"] == "3"
    assert response.headers["Total-Count"] == "45"
    rels = links(response)
    assert set(rels) == {"first", "next", "last"}
    assert "page=2" in rels["next"]
    assert "page=3" in rels["last"]

    seen: list[int] = []
    url: str | None = api.url("/customers?items=7")
    pages = 0
    while url:
        page = client.get(url, headers={"Authorization": f"Bearer {api.token}"})
        assert page.status_code == 200, page.text
        pages += 1
        assert page.headers["Current-Page"] == str(pages)
        assert page.headers["Page-Items"] == "7"
        assert page.headers["Total-Pages"] == "7"
        rels = links(page)
        assert {"first", "last"} <= set(rels)
        assert ("prev" in rels) == (pages > 1)
        seen.extend(c["id"] for c in page.json())
        url = rels.get("next")
    assert pages == 7
    assert sorted(seen) == sorted(many)
    assert len(seen) == len(set(seen))

    last = client.get(links(response)["last"], headers={"Authorization": f"Bearer {api.token}"})
    assert len(last.json()) == 5
    assert "next" not in links(last)
    assert "page=2" in links(last)["prev"]


def test_pagination_bounds(api: StoreApi, many: list[int]) -> None:
    response = api.get("/customers", params={"items": 1000})
    assert response.headers["Page-Items"] == "100"
    assert len(response.json()) == 45
    assert response.headers["Total-Pages"] == "1"
    beyond = api.get("/customers", params={"page": 9})
    assert beyond.status_code == 200
    assert beyond.json() == []
    assert beyond.headers["Current-Page"] == "9"
    for params in ({"page": 0}, {"page": -1}, {"page": "x"}, {"items": 0}, {"items": "many"}):
        assert_invalid(api.get("/customers", params=params), next(iter(params)))
    # The search narrows the count, and pages within it.
    narrowed = api.get("/customers", params={"search": "many1", "items": 3})
    assert narrowed.headers["Total-Count"] == "11"  # Many01, Many10..Many19
    assert narrowed.headers["Total-Pages"] == "4"
    assert "search=many1" in links(narrowed)["next"]


# --- show / update -------------------------------------------------------------------------------


def test_unknown_customer_is_404(api: StoreApi) -> None:
    for path in ("/customers/999999", "/customers/abc", "/customers/0", f"/customers/{2**70}"):
        assert_error(api.get(path), 404)
        assert_error(api.patch(path, json={"customer": {"first_name": "X"}}), 404)
        assert_error(api.put(path, json={"customer": {"first_name": "X"}}), 404)


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_update_merges_metadata_and_upserts_references(
    api: StoreApi, engine: Engine, method: str
) -> None:
    created = api.create_customer(
        {
            "first_name": "Up",
            "last_name": "Date",
            "email": "up@example.com",
            "metadata": {"a": 1, "b": 2, "c": {"deep": True}},
            "external_references": [
                {"source": "square", "external_id": "S1", "metadata": {"p": 1}}
            ],
        }
    )
    response = api.request(
        method,
        f"/customers/{created['id']}",
        json={
            "customer": {
                "email": "NEW@Example.com",
                "phone": "212 555 0123",
                "birthday": "--07-04",
                "metadata": {"b": 3, "c": None, "d": [1]},
                "external_references": [
                    {"source": "square", "external_id": "S1", "metadata": {"q": 2}},
                    {"source": "mailchimp", "external_id": "mc-1"},
                ],
            }
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_customer_shape(body)
    assert body["id"] == created["id"]
    assert (body["first_name"], body["last_name"]) == ("Up", "Date")  # not sent: kept
    assert body["email"] == "new@example.com"
    assert body["phone"] == "+12125550123"
    assert body["birthday"] == "--07-04"
    assert body["metadata"] == {"a": 1, "b": 3, "d": [1]}
    refs = {(r["source"], r["external_id"]): r["metadata"] for r in body["external_references"]}
    assert refs == {("square", "S1"): {"p": 1, "q": 2}, ("mailchimp", "mc-1"): {}}
    assert api.get(f"/customers/{created['id']}").json() == body
    assert references_count(engine, api.id) == 2
    # The old email no longer finds them; the new one does.
    assert api.get("/customers", params={"search": "up@example.com"}).json() == []
    assert [c["id"] for c in api.get("/customers", params={"search": "new@"}).json()] == [
        created["id"]
    ]


def test_update_validation(api: StoreApi, engine: Engine) -> None:
    other = api.create_customer({"first_name": "O", "email": "o@example.com"})
    created = api.create_customer({"first_name": "V", "email": "v@example.com"})
    path = f"/customers/{created['id']}"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"first_name": None}, "first_name"),
        ({"first_name": ""}, "first_name"),
        ({"email": "nope"}, "email"),
        ({"email": "O@example.com"}, "email"),
        ({"phone": "123"}, "phone"),
        ({"email": None}, "base"),  # would leave neither email nor phone
        ({"birthday": "--02-30"}, "birthday"),
        ({"metadata": 3}, "metadata"),
        ({"external_references": [{"source": "", "external_id": "1"}]}, "external_references"),
    ]
    for customer, field in cases:
        assert_invalid(api.patch(path, json={"customer": customer}), field)
    assert_invalid(api.patch(path, json={"first_name": "no wrapper"}), "customer")
    assert_invalid(api.put(path, json={"customer": "V"}), "customer")
    assert api.get(path).json() == created
    assert api.get(f"/customers/{other['id']}").json() == other
    # Clearing the email is fine once a phone is there.
    response = api.patch(path, json={"customer": {"phone": "+12125550999", "email": None}})
    assert response.status_code == 200, response.text
    assert (response.json()["email"], response.json()["phone"]) == (None, "+12125550999")
