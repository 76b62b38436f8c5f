"""models/customers.py on SQLite and PostgreSQL: create/upsert, update, references, search."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.cards import create_card, enrol
from models.customers import (
    UNSET,
    CustomerFields,
    ReferenceInput,
    UpsertResult,
    create_customer,
    find_by_reference,
    get_customer,
    list_customers,
    parse_references,
    update_customer,
)
from models.errors import NotFound, ValidationFailed
from models.normalize import METADATA_MAX_BYTES
from models.tables import Customer, ExternalReference

MakeStore = Callable[..., tuple[int, str]]


def _create(
    session: Session,
    store_id: int,
    references: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> UpsertResult:
    return create_customer(
        session,
        store_id=store_id,
        fields=CustomerFields(**fields),
        references=parse_references(references),
    )


def _update(
    session: Session,
    store_id: int,
    customer: Customer,
    references: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> Customer:
    return update_customer(
        session,
        store_id=store_id,
        customer=customer,
        fields=CustomerFields(**fields),
        references=parse_references(references),
    )


def _customer_count(session: Session, store_id: int) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(Customer).where(Customer.store_id == store_id)
        )
        or 0
    )


def _reload(session: Session, store_id: int, customer_id: int) -> Customer:
    session.expire_all()
    return get_customer(session, store_id=store_id, customer_id=customer_id)


def _search(session: Session, store_id: int, term: str) -> list[int]:
    return [c.id for c in list_customers(session, store_id=store_id, search=term).items]


@pytest.fixture
def store_id(make_store: MakeStore) -> int:
    return make_store()[0]


# --- required fields ----------------------------------------------------------------------------


def test_create_with_all_fields_normalises_and_stores_them(session: Session, store_id: int) -> None:
    result = _create(
        session,
        store_id,
        first_name="  Jane ",
        last_name="Doe",
        email="Jane.Doe@Example.COM",
        phone="+1 (212) 555-4240",
        birthday="1990-04-23",
        metadata={"tier": "gold"},
    )
    session.commit()
    assert result.created is True
    customer = _reload(session, store_id, result.customer.id)
    assert customer.first_name == "Jane"
    assert customer.last_name == "Doe"
    assert customer.email == "jane.doe@example.com"
    assert customer.phone == "+12125554240"
    assert (customer.birth_year, customer.birth_month, customer.birth_day) == (1990, 4, 23)
    assert customer.metadata_ == {"tier": "gold"}
    assert customer.state == "active"
    assert customer.created_at.tzinfo is not None


def test_create_requires_first_name(session: Session, store_id: int) -> None:
    for first_name in (UNSET, None, "", "   "):
        with pytest.raises(ValidationFailed) as info:
            _create(session, store_id, first_name=first_name, email="jane@example.com")
        assert info.value.errors == {"first_name": ["can't be blank"]}, first_name
    assert _customer_count(session, store_id) == 0


def test_create_requires_email_or_phone(session: Session, store_id: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        _create(session, store_id, first_name="Jane", email="", phone=None)
    assert list(info.value.errors) == ["base"]
    assert "email or phone" in info.value.errors["base"][0]
    # Either one alone is enough.
    assert _create(session, store_id, first_name="A", email="a@example.com").created
    assert _create(session, store_id, first_name="B", phone="+12125554241").created


def test_create_names_every_invalid_field_at_once(session: Session, store_id: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        _create(
            session,
            store_id,
            first_name="Jane",
            email="not-an-email",
            phone="12",
            birthday="2023-02-29",
            metadata=[1, 2],
        )
    assert {"email", "phone", "birthday", "metadata"} <= set(info.value.errors)
    assert _customer_count(session, store_id) == 0


_INVALID_FIELDS: list[tuple[str, Any]] = [
    ("email", "jane@"),
    ("email", 5),
    ("phone", "not a phone"),
    ("phone", "+1 212 555"),
    ("birthday", "--02-30"),
    ("birthday", "1999-13-01"),
    ("birthday", "23/04/1990"),
    ("metadata", "a string"),
    ("first_name", 42),
    ("last_name", "x" * 201),
]


def test_invalid_field_is_named(session: Session, store_id: int) -> None:
    for field, value in _INVALID_FIELDS:
        fields: dict[str, Any] = {
            "first_name": "Jane",
            "email": "jane@example.com",
            "phone": "+12125554240",
            field: value,
        }
        with pytest.raises(ValidationFailed) as info:
            _create(session, store_id, **fields)
        assert list(info.value.errors) == [field], (field, value)
    assert _customer_count(session, store_id) == 0


# --- uniqueness ---------------------------------------------------------------------------------


def test_email_is_unique_per_store_case_insensitively(session: Session, store_id: int) -> None:
    _create(session, store_id, first_name="A", email="A@x.com")
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _create(session, store_id, first_name="B", email="a@x.com")
    assert info.value.errors == {"email": ["has already been taken"]}
    session.rollback()
    assert _customer_count(session, store_id) == 1


def test_same_email_and_phone_in_two_stores_is_fine(
    session: Session, make_store: MakeStore
) -> None:
    a, _ = make_store()
    b, _ = make_store()
    first = _create(session, a, first_name="A", email="a@x.com", phone="+12125554240")
    second = _create(session, b, first_name="B", email="A@X.com", phone="(212) 555-4240")
    session.commit()
    assert first.customer.id != second.customer.id
    assert second.customer.email == "a@x.com"
    assert second.customer.phone == "+12125554240"


def test_phone_is_unique_per_store_in_normalised_form(session: Session, store_id: int) -> None:
    _create(session, store_id, first_name="A", phone="+1 (212) 555-4240")
    session.commit()
    for variant in ("+12125554240", "(212) 555-4240", "212.555.4240"):
        with pytest.raises(ValidationFailed) as info:
            _create(session, store_id, first_name="B", phone=variant)
        assert info.value.errors == {"phone": ["has already been taken"]}
        session.rollback()
    assert _customer_count(session, store_id) == 1


def test_phone_uses_the_store_region(session: Session, make_store: MakeStore) -> None:
    gb, _ = make_store(country="GB")
    customer = _create(session, gb, first_name="A", phone="020 7946 0958").customer
    assert customer.phone == "+442079460958"


def test_update_to_a_taken_email_or_phone_names_the_field(session: Session, store_id: int) -> None:
    _create(session, store_id, first_name="A", email="a@x.com", phone="+12125554240")
    b = _create(session, store_id, first_name="B", email="b@x.com").customer
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _update(session, store_id, b, email="A@X.COM", phone="(212) 555-4240")
    assert info.value.errors == {
        "email": ["has already been taken"],
        "phone": ["has already been taken"],
    }
    session.rollback()
    # Also when references come along (looking them up must not flush the taken email).
    with pytest.raises(ValidationFailed) as info:
        _update(session, store_id, b, [{"source": "shopify", "external_id": "9"}], email="a@x.com")
    assert info.value.errors == {"email": ["has already been taken"]}
    session.rollback()
    assert _reload(session, store_id, b.id).email == "b@x.com"
    assert _refs(session, store_id) == []
    # Re-saving a customer's own email/phone is not a conflict with itself.
    a = list_customers(session, store_id=store_id, search="a@x.com").items[0]
    _update(session, store_id, a, email="A@x.com", phone="+1 212 555 4240")
    session.commit()


# --- birthday and metadata ----------------------------------------------------------------------


def test_birthday_with_and_without_year_is_stored(session: Session, store_id: int) -> None:
    cases = [
        ("--02-29", (None, 2, 29)),
        ("0000-12-31", (None, 12, 31)),
        ("1985-07-04", (1985, 7, 4)),
    ]
    ids = [
        _create(session, store_id, first_name="A", email=f"a{i}@x.com", birthday=raw).customer.id
        for i, (raw, _) in enumerate(cases)
    ]
    session.commit()
    for customer_id, (raw, stored) in zip(ids, cases, strict=True):
        customer = _reload(session, store_id, customer_id)
        assert (customer.birth_year, customer.birth_month, customer.birth_day) == stored, raw


def test_metadata_is_shallow_merged_on_update_and_null_removes(
    session: Session, store_id: int
) -> None:
    created = _create(
        session, store_id, first_name="A", email="a@x.com", metadata={"a": 1, "b": 2, "n": {"x": 1}}
    )
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    _update(session, store_id, customer, metadata={"b": 3, "c": [1, 2], "n": {"y": 2}})
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    assert customer.metadata_ == {"a": 1, "b": 3, "c": [1, 2], "n": {"y": 2}}
    _update(session, store_id, customer, metadata={"a": None, "missing": None})
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    assert customer.metadata_ == {"b": 3, "c": [1, 2], "n": {"y": 2}}
    # Absent or null metadata leaves it alone.
    _update(session, store_id, customer, last_name="Z")
    _update(session, store_id, customer, metadata=None)
    session.commit()
    assert _reload(session, store_id, created.customer.id).metadata_ == {
        "b": 3,
        "c": [1, 2],
        "n": {"y": 2},
    }


def test_metadata_must_be_an_object(session: Session, store_id: int) -> None:
    for metadata in ([1], "x", 3, True):
        with pytest.raises(ValidationFailed) as info:
            _create(session, store_id, first_name="A", email="a@x.com", metadata=metadata)
        assert info.value.errors == {"metadata": ["must be a JSON object"]}, metadata
    customer = _create(session, store_id, first_name="A", email="a@x.com").customer
    for metadata in ([1], "x"):
        with pytest.raises(ValidationFailed) as info:
            _update(session, store_id, customer, metadata=metadata)
        assert info.value.errors == {"metadata": ["must be a JSON object"]}, metadata


def test_metadata_size_cap(session: Session, store_id: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        _create(session, store_id, first_name="A", email="a@x.com", metadata={"x": "y" * 17_000})
    assert list(info.value.errors) == ["metadata"]
    assert f"maximum is {METADATA_MAX_BYTES}" in info.value.errors["metadata"][0]
    session.rollback()
    # The cap applies to the merged result: two halves that fit alone don't fit together.
    half = "y" * (METADATA_MAX_BYTES // 2)
    customer = _create(
        session, store_id, first_name="A", email="a@x.com", metadata={"a": half}
    ).customer
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _update(session, store_id, customer, metadata={"b": half})
    assert list(info.value.errors) == ["metadata"]
    session.rollback()
    assert _reload(session, store_id, customer.id).metadata_ == {"a": half}


# --- partial update -----------------------------------------------------------------------------


def test_update_is_partial(session: Session, store_id: int) -> None:
    created = _create(
        session,
        store_id,
        first_name="Jane",
        last_name="Doe",
        email="jane@x.com",
        phone="+12125554240",
        birthday="--04-23",
        metadata={"a": 1},
    )
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    _update(session, store_id, customer, last_name="Roe")
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    assert customer.first_name == "Jane"
    assert customer.last_name == "Roe"
    assert customer.email == "jane@x.com"
    assert customer.phone == "+12125554240"
    assert (customer.birth_year, customer.birth_month, customer.birth_day) == (None, 4, 23)
    assert customer.metadata_ == {"a": 1}
    # The search text follows the update.
    assert _search(session, store_id, "jane roe") == [customer.id]
    assert _search(session, store_id, "jane doe") == []


def test_blank_optional_fields_clear_them(session: Session, store_id: int) -> None:
    created = _create(
        session,
        store_id,
        first_name="Jane",
        last_name="Doe",
        email="jane@x.com",
        phone="+12125554240",
        birthday="1990-01-01",
    )
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    _update(session, store_id, customer, last_name="", birthday="", phone=None)
    session.commit()
    customer = _reload(session, store_id, created.customer.id)
    assert customer.last_name is None
    assert customer.phone is None
    assert (customer.birth_year, customer.birth_month, customer.birth_day) == (None, None, None)
    assert customer.email == "jane@x.com"
    # The cleared phone is free for someone else.
    _create(session, store_id, first_name="B", phone="(212) 555-4240")
    session.commit()


def test_first_name_cannot_be_blanked(session: Session, store_id: int) -> None:
    customer = _create(session, store_id, first_name="Jane", email="jane@x.com").customer
    session.commit()
    for blank in ("", "  ", None):
        with pytest.raises(ValidationFailed) as info:
            _update(session, store_id, customer, first_name=blank)
        assert list(info.value.errors) == ["first_name"], blank
        session.rollback()
        assert _reload(session, store_id, customer.id).first_name == "Jane"


def test_cannot_remove_both_email_and_phone(session: Session, store_id: int) -> None:
    customer = _create(
        session, store_id, first_name="Jane", email="jane@x.com", phone="+12125554240"
    ).customer
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _update(session, store_id, customer, email="", phone="")
    assert list(info.value.errors) == ["base"]
    session.rollback()
    customer = _reload(session, store_id, customer.id)
    assert (customer.email, customer.phone) == ("jane@x.com", "+12125554240")
    # Removing one of them is fine; then the other can't go.
    _update(session, store_id, customer, email="")
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _update(session, store_id, customer, phone=None)
    assert list(info.value.errors) == ["base"]


# --- external references ------------------------------------------------------------------------


def _refs(session: Session, store_id: int) -> list[tuple[str, str, int, dict[str, Any]]]:
    session.expire_all()
    rows = session.scalars(
        select(ExternalReference)
        .where(ExternalReference.store_id == store_id)
        .order_by(ExternalReference.id)
    ).all()
    return [(r.source, r.external_id, r.customer_id, r.metadata_) for r in rows]


@pytest.mark.parametrize(
    "refs",
    [
        [{"source": "Shopify", "external_id": "1"}],
        [{"source": "shop-ify", "external_id": "1"}],
        [{"source": "shopify\n", "external_id": "1"}],
        [{"source": "shopify", "external_id": ""}],
        [{"source": "shopify", "external_id": None}],
        [{"source": "shopify"}],
        [{"source": "shopify", "external_id": "1", "metadata": [1]}],
        ["shopify:1"],
        {"source": "shopify", "external_id": "1"},
    ],
)
def test_invalid_references_are_rejected(refs: Any) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_references(refs)
    assert list(info.value.errors) == ["external_references"]


def test_parse_references_folds_duplicates_and_accepts_numeric_ids() -> None:
    refs = parse_references(
        [
            {"source": "shopify", "external_id": 5501, "metadata": {"a": 1}},
            {"source": "shopify", "external_id": "5501", "metadata": {"b": 2}},
            {"source": "square", "external_id": "SQ1"},
        ]
    )
    assert refs == [
        ReferenceInput("shopify", "5501", {"a": 1, "b": 2}),
        ReferenceInput("square", "SQ1", {}),
    ]
    assert parse_references(None) == []


def test_references_are_stored_with_their_metadata(session: Session, store_id: int) -> None:
    customer = _create(
        session,
        store_id,
        [
            {"source": "shopify", "external_id": "1", "metadata": {"tags": ["vip"]}},
            {"source": "square", "external_id": "SQ1"},
        ],
        first_name="Jane",
        email="jane@x.com",
    ).customer
    session.commit()
    assert _refs(session, store_id) == [
        ("shopify", "1", customer.id, {"tags": ["vip"]}),
        ("square", "SQ1", customer.id, {}),
    ]
    loaded = _reload(session, store_id, customer.id)
    assert [(r.source, r.external_id) for r in loaded.external_references] == [
        ("shopify", "1"),
        ("square", "SQ1"),
    ]


def test_create_with_existing_references_upserts_that_customer(
    session: Session, store_id: int
) -> None:
    first = _create(
        session,
        store_id,
        [{"source": "shopify", "external_id": "1", "metadata": {"a": 1, "b": 2}}],
        first_name="Jane",
        email="jane@x.com",
        metadata={"m": 1},
    )
    session.commit()
    assert first.created is True
    second = _create(
        session,
        store_id,
        [
            {"source": "shopify", "external_id": "1", "metadata": {"b": 3, "a": None}},
            {"source": "square", "external_id": "SQ1"},
        ],
        first_name="Janet",
        last_name="Doe",
        phone="+12125554240",
        metadata={"n": 2},
    )
    session.commit()
    assert second.created is False
    assert second.customer.id == first.customer.id
    assert _customer_count(session, store_id) == 1
    customer = _reload(session, store_id, first.customer.id)
    assert (customer.first_name, customer.last_name) == ("Janet", "Doe")
    assert customer.email == "jane@x.com"  # not sent: untouched
    assert customer.phone == "+12125554240"
    assert customer.metadata_ == {"m": 1, "n": 2}
    assert _refs(session, store_id) == [
        ("shopify", "1", customer.id, {"b": 3}),
        ("square", "SQ1", customer.id, {}),
    ]


def test_create_with_the_same_references_twice_is_safe(session: Session, store_id: int) -> None:
    payload: dict[str, Any] = {
        "references": [{"source": "shopify", "external_id": "42"}],
        "first_name": "Jane",
        "email": "jane@x.com",
    }
    results = [_create(session, store_id, **payload) for _ in range(3)]
    session.commit()
    assert [r.created for r in results] == [True, False, False]
    assert len({r.customer.id for r in results}) == 1
    assert _customer_count(session, store_id) == 1
    assert len(_refs(session, store_id)) == 1


def test_references_pointing_at_two_customers_conflict(session: Session, store_id: int) -> None:
    a = _create(
        session,
        store_id,
        [{"source": "shopify", "external_id": "1"}],
        first_name="A",
        email="a@x.com",
    ).customer
    b = _create(
        session,
        store_id,
        [{"source": "square", "external_id": "2"}],
        first_name="B",
        email="b@x.com",
    ).customer
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _create(
            session,
            store_id,
            [{"source": "shopify", "external_id": "1"}, {"source": "square", "external_id": "2"}],
            first_name="C",
            email="c@x.com",
        )
    assert list(info.value.errors) == ["external_references"]
    message = info.value.errors["external_references"][0]
    assert f"customer {a.id}" in message
    assert f"customer {b.id}" in message
    session.rollback()
    assert _customer_count(session, store_id) == 2


def test_update_with_a_reference_of_another_customer_fails(session: Session, store_id: int) -> None:
    a = _create(
        session,
        store_id,
        [{"source": "shopify", "external_id": "1"}],
        first_name="A",
        email="a@x.com",
    ).customer
    b = _create(session, store_id, first_name="B", email="b@x.com").customer
    session.commit()
    with pytest.raises(ValidationFailed) as info:
        _update(session, store_id, b, [{"source": "shopify", "external_id": "1"}])
    assert list(info.value.errors) == ["external_references"]
    assert f"customer {a.id}" in info.value.errors["external_references"][0]
    session.rollback()
    assert _refs(session, store_id) == [("shopify", "1", a.id, {})]


def test_update_upserts_references_and_merges_their_metadata(
    session: Session, store_id: int
) -> None:
    customer = _create(
        session,
        store_id,
        [{"source": "shopify", "external_id": "1", "metadata": {"a": 1, "b": 2}}],
        first_name="A",
        email="a@x.com",
    ).customer
    session.commit()
    for _ in range(2):  # the same update twice changes nothing more
        _update(
            session,
            store_id,
            customer,
            [
                {"source": "shopify", "external_id": "1", "metadata": {"b": None, "c": 3}},
                {"source": "loke", "external_id": "L-9", "metadata": {"x": True}},
            ],
        )
        session.commit()
    assert _refs(session, store_id) == [
        ("shopify", "1", customer.id, {"a": 1, "c": 3}),
        ("loke", "L-9", customer.id, {"x": True}),
    ]


def test_same_reference_in_two_stores_is_two_customers(
    session: Session, make_store: MakeStore
) -> None:
    a, _ = make_store()
    b, _ = make_store()
    ref = [{"source": "shopify", "external_id": "1"}]
    ca = _create(session, a, ref, first_name="A", email="a@x.com")
    cb = _create(session, b, ref, first_name="B", email="b@x.com")
    session.commit()
    assert ca.created
    assert cb.created
    assert ca.customer.id != cb.customer.id
    found = find_by_reference(session, store_id=b, source="shopify", external_id="1")
    assert found is not None
    assert found.id == cb.customer.id


# --- lookups and search -------------------------------------------------------------------------


@pytest.fixture
def people(session: Session, store_id: int) -> dict[str, int]:
    """A small directory of customers in one store (and a decoy in another)."""
    rows = {
        "jane": _create(
            session,
            store_id,
            [{"source": "shopify", "external_id": "gid-777"}],
            first_name="Jane",
            last_name="Doe",
            email="jane.doe@example.com",
            phone="+1 (212) 555-4240",
        ),
        "john": _create(
            session,
            store_id,
            [{"source": "square", "external_id": "SQ-1"}],
            first_name="John",
            last_name="Smith",
            email="jsmith@corp.org",
            phone="+1 (415) 555-0199",
        ),
        "percent": _create(
            session, store_id, first_name="Ann%", last_name="Lee", email="ann@lee.io"
        ),
        "underscore": _create(
            session, store_id, first_name="Bo_b", last_name="Ray", email="bob@ray.io"
        ),
        "backslash": _create(
            session, store_id, first_name="Eve\\", last_name="Kay", email="eve@kay.io"
        ),
    }
    session.commit()
    return {k: v.customer.id for k, v in rows.items()}


_SEARCH_CASES: list[tuple[str, list[str]]] = [
    ("jane", ["jane"]),
    ("JANE", ["jane"]),
    ("Doe", ["jane"]),
    ("jane do", ["jane"]),
    ("Jane Doe", ["jane"]),
    ("ane d", ["jane"]),
    ("  jane  ", ["jane"]),
    ("john smith", ["john"]),
    ("jane smith", []),
    ("example.com", ["jane"]),
    ("JSMITH@CORP", ["john"]),
    ("@", ["jane", "john", "percent", "underscore", "backslash"]),
    ("212-555", ["jane"]),
    ("(212) 555-4240", ["jane"]),
    ("+1 212 555 4240", ["jane"]),
    ("2125554240", ["jane"]),
    ("555", ["jane", "john"]),
    ("0199", ["john"]),
    ("gid-777", ["jane"]),  # exact external id of any source
    ("SQ-1", ["john"]),
    ("gid-77", []),  # external ids match exactly, not by substring
    ("nobody", []),
]


def test_search(session: Session, store_id: int, people: dict[str, int]) -> None:
    for term, expected in _SEARCH_CASES:
        found = _search(session, store_id, term)
        assert found == sorted(people[name] for name in expected), term


_WILDCARD_CASES: list[tuple[str, list[str]]] = [
    ("%", ["percent"]),
    ("ann%", ["percent"]),
    ("n%", ["percent"]),
    ("_", ["underscore"]),
    ("o_b", ["underscore"]),
    ("j_ne", []),  # `_` is not "any character"
    ("j%e", []),  # `%` is not "anything"
    ("\\", ["backslash"]),
    ("eve\\", ["backslash"]),
    ("\\%", []),
]


def test_search_treats_like_wildcards_literally(
    session: Session, store_id: int, people: dict[str, int]
) -> None:
    for term, expected in _WILDCARD_CASES:
        found = _search(session, store_id, term)
        assert found == sorted(people[name] for name in expected), term


def test_blank_search_lists_everyone(
    session: Session, store_id: int, people: dict[str, int]
) -> None:
    everyone = sorted(people.values())
    assert _search(session, store_id, "") == everyone
    assert _search(session, store_id, "   ") == everyone
    assert [c.id for c in list_customers(session, store_id=store_id).items] == everyone


def test_search_by_exact_card_code(session: Session, store_id: int, people: dict[str, int]) -> None:
    card = create_card(session, store_id=store_id, name="Coffee", stamps_required=10)
    jane = get_customer(session, store_id=store_id, customer_id=people["jane"])
    cc, _ = enrol(session, customer=jane, card=card)
    session.commit()
    assert _search(session, store_id, cc.code) == [jane.id]
    assert _search(session, store_id, f" {cc.code} ") == [jane.id]


def test_lookup_by_source_and_external_id(
    session: Session, store_id: int, people: dict[str, int]
) -> None:
    page = list_customers(session, store_id=store_id, source="shopify", external_id="gid-777")
    assert [c.id for c in page.items] == [people["jane"]]
    assert page.total_count == 1
    # Exact on both halves of the pair.
    for source, external_id in (("square", "gid-777"), ("shopify", "GID-777"), ("shopify", "gid")):
        page = list_customers(session, store_id=store_id, source=source, external_id=external_id)
        assert page.items == []
        assert page.total_count == 0
    found = find_by_reference(session, store_id=store_id, source="square", external_id="SQ-1")
    assert found is not None
    assert found.id == people["john"]
    assert find_by_reference(session, store_id=store_id, source="square", external_id="x") is None


def test_lookup_needs_both_source_and_external_id(session: Session, store_id: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        list_customers(session, store_id=store_id, source="shopify")
    assert list(info.value.errors) == ["external_id"]
    with pytest.raises(ValidationFailed) as info:
        list_customers(session, store_id=store_id, external_id="1")
    assert list(info.value.errors) == ["source"]


def test_pagination(session: Session, store_id: int) -> None:
    ids = [
        _create(session, store_id, first_name=f"Pat {i:02d}", email=f"pat{i}@x.com").customer.id
        for i in range(25)
    ]
    _create(session, store_id, first_name="Other", email="other@x.com")
    session.commit()
    pages = [
        list_customers(session, store_id=store_id, search="pat", page=n, per_page=10)
        for n in (1, 2, 3, 4)
    ]
    for page in pages:
        assert page.total_count == 25
        assert page.total_pages == 3
        assert page.per_page == 10
    assert [len(p.items) for p in pages] == [10, 10, 5, 0]
    assert [c.id for p in pages for c in p.items] == ids
    everyone = list_customers(session, store_id=store_id, per_page=100)
    assert (everyone.total_count, everyone.total_pages, len(everyone.items)) == (26, 1, 26)
    none = list_customers(session, store_id=store_id, search="nobody")
    assert (none.total_count, none.total_pages, none.items) == (0, 1, [])
    exact = list_customers(session, store_id=store_id, per_page=5)
    assert exact.total_pages == 6


def test_store_isolation(session: Session, make_store: MakeStore) -> None:
    a, _ = make_store()
    b, _ = make_store()
    mine = _create(
        session,
        a,
        [{"source": "shopify", "external_id": "X1"}],
        first_name="Jane",
        last_name="Doe",
        email="jane@x.com",
        phone="+12125554240",
    ).customer
    theirs = _create(
        session,
        b,
        [{"source": "shopify", "external_id": "X2"}],
        first_name="Jane",
        last_name="Doe",
        email="jane@x.com",
        phone="+12125554240",
    ).customer
    card_b = create_card(session, store_id=b, name="B card", stamps_required=5)
    cc_b, _ = enrol(session, customer=theirs, card=card_b)
    session.commit()
    for term in ("jane", "jane@x.com", "212555", "X1"):
        assert _search(session, a, term) == [mine.id]
    assert _search(session, a, "X2") == []
    assert _search(session, a, cc_b.code) == []
    assert list_customers(session, store_id=a, source="shopify", external_id="X2").items == []
    assert find_by_reference(session, store_id=a, source="shopify", external_id="X2") is None
    assert [c.id for c in list_customers(session, store_id=a).items] == [mine.id]
    assert list_customers(session, store_id=a).total_count == 1
    with pytest.raises(NotFound):
        get_customer(session, store_id=a, customer_id=theirs.id)
    # A reference of store B given in store A creates a new customer there, not a link.
    result = _create(
        session, a, [{"source": "shopify", "external_id": "X2"}], first_name="J", email="j@x.com"
    )
    assert result.created is True
    assert result.customer.id != theirs.id


def test_get_customer_not_found(session: Session, store_id: int) -> None:
    with pytest.raises(NotFound):
        get_customer(session, store_id=store_id, customer_id=999_999)


def test_unknown_store_is_not_found(session: Session) -> None:
    with pytest.raises(NotFound):
        _create(session, 999_999, first_name="A", email="a@x.com")


# --- a failed call leaves nothing behind --------------------------------------------------------
# A sync batch catches a record's ValidationFailed and commits the rest: the failed record must
# not have written anything into the transaction.


def test_failed_update_leaves_the_customer_unchanged_even_if_the_caller_commits(
    session: Session, store_id: int
) -> None:
    _create(session, store_id, first_name="A", email="a@x.com")
    b = _create(
        session, store_id, first_name="B", email="b@x.com", phone="+12125554240", metadata={"k": 1}
    ).customer
    session.commit()
    attempts: list[dict[str, Any]] = [
        {"email": "", "phone": ""},  # removes both contacts
        {"email": "a@x.com", "last_name": "Changed"},  # taken email
        {"first_name": "", "metadata": {"k": 2}},
        {
            "last_name": "Changed",
            "references": [{"source": "s", "external_id": "1", "metadata": {"x": "y" * 17_000}}],
        },
    ]
    for attempt in attempts:
        with pytest.raises(ValidationFailed):
            _update(session, store_id, b, **attempt)
        session.commit()  # commits the rest of the "batch"
        b = _reload(session, store_id, b.id)
        assert (b.first_name, b.last_name, b.email, b.phone, b.metadata_) == (
            "B",
            None,
            "b@x.com",
            "+12125554240",
            {"k": 1},
        )
        assert _refs(session, store_id) == []


def test_failed_create_leaves_nothing_even_if_the_caller_commits(
    session: Session, store_id: int
) -> None:
    big = {"x": "y" * 17_000}
    with pytest.raises(ValidationFailed) as info:
        _create(
            session,
            store_id,
            [{"source": "shopify", "external_id": "1", "metadata": big}],
            first_name="A",
            email="a@x.com",
        )
    assert list(info.value.errors) == ["external_references"]
    session.commit()
    assert _customer_count(session, store_id) == 0
    assert _refs(session, store_id) == []
    # The same record, fixed, goes through afterwards.
    assert _create(
        session,
        store_id,
        [{"source": "shopify", "external_id": "1"}],
        first_name="A",
        email="a@x.com",
    ).created
    session.commit()
    assert _customer_count(session, store_id) == 1
