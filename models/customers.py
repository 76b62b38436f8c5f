"""Customers and their external references: create/upsert, update, look-up and search."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import ColumnElement, and_, func, or_, select, tuple_, union
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from models.errors import ErrorBag, NotFound, ValidationFailed
from models.normalize import (
    NAME_MAX,
    Birthday,
    FieldError,
    build_search_text,
    check_external_id,
    check_metadata,
    check_source,
    check_text,
    merge_metadata,
    normalise_email,
    normalise_phone,
    parse_birthday,
    phone_digits,
)
from models.tables import Customer, CustomerCard, ExternalReference, Store, is_valid_id


class _Unset:
    """Marks a field the caller did not send (distinct from an explicit null)."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = _Unset()

# Customers left out of lists and searches: merged away (their survivor is listed), erased, and
# the holders of tombstones of records deleted before they ever arrived (models/ingest.py).
HIDDEN_STATES: Final = ("merged", "redacted", "deleted")


@dataclass(slots=True)
class CustomerFields:
    """Raw customer attributes as a client sent them; UNSET = not sent."""

    first_name: Any = UNSET
    last_name: Any = UNSET
    email: Any = UNSET
    phone: Any = UNSET
    birthday: Any = UNSET
    metadata: Any = UNSET


@dataclass(slots=True)
class ReferenceInput:
    source: str
    external_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Normalised:
    values: dict[str, Any]
    metadata_patch: dict[str, Any] | None


def parse_references(raw: Any) -> list[ReferenceInput]:
    """Validate `external_references` (a list of `{source, external_id, metadata}`).

    The same pair given twice in one request is folded into one (metadata merged in order).
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValidationFailed.single("external_references", "must be an array")
    bag = ErrorBag()
    folded: dict[tuple[str, str], ReferenceInput] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            bag.add("external_references", f"item {index}: must be an object")
            continue
        try:
            source = check_source(item.get("source"))
            external_id = check_external_id(item.get("external_id"))
            meta = item.get("metadata")
            meta = {} if meta is None else check_metadata(meta)
        except FieldError as exc:
            bag.add("external_references", f"item {index}: {exc}")
            continue
        key = (source, external_id)
        if key in folded:
            folded[key].metadata.update(meta)
        else:
            folded[key] = ReferenceInput(source=source, external_id=external_id, metadata=meta)
    bag.raise_if_any()
    return list(folded.values())


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _name(raw: str) -> str:
    value = raw.strip()
    if len(value) > NAME_MAX:
        raise FieldError(f"is too long (maximum is {NAME_MAX} characters)")
    return check_text(value)


def _normalise(fields: CustomerFields, *, region: str, bag: ErrorBag) -> _Normalised:
    """Validate the fields that were sent; blank strings mean "clear" for optional fields."""
    values: dict[str, Any] = {}
    validators: tuple[tuple[str, Callable[[str], str]], ...] = (
        ("first_name", _name),
        ("last_name", _name),
        ("email", normalise_email),
        ("phone", lambda v: normalise_phone(v, region)),
    )
    for name, validate in validators:
        raw = getattr(fields, name)
        if raw is UNSET:
            continue
        if _blank(raw):
            values[name] = None
        elif not isinstance(raw, str):
            bag.add(name, "must be a string")
        else:
            try:
                values[name] = validate(raw)
            except FieldError as exc:
                bag.add(name, str(exc))
    if fields.birthday is not UNSET:
        if _blank(fields.birthday):
            values["birthday"] = None
        elif not isinstance(fields.birthday, str):
            bag.add("birthday", "must be a string (YYYY-MM-DD or --MM-DD)")
        else:
            try:
                values["birthday"] = parse_birthday(fields.birthday)
            except FieldError as exc:
                bag.add("birthday", str(exc))
    patch: dict[str, Any] | None = None
    if fields.metadata is not UNSET and fields.metadata is not None:
        try:
            patch = check_metadata(fields.metadata)
        except FieldError as exc:
            bag.add("metadata", str(exc))
    return _Normalised(values=values, metadata_patch=patch)


def _apply(customer: Customer, norm: _Normalised, bag: ErrorBag) -> None:
    for name in ("first_name", "last_name", "email", "phone"):
        if name in norm.values:
            setattr(customer, name, norm.values[name])
    if "birthday" in norm.values:
        bday: Birthday | None = norm.values["birthday"]
        customer.birth_year = bday.year if bday else None
        customer.birth_month = bday.month if bday else None
        customer.birth_day = bday.day if bday else None
    if norm.metadata_patch is not None:
        try:
            customer.metadata_ = merge_metadata(customer.metadata_, norm.metadata_patch)
        except FieldError as exc:
            bag.add("metadata", str(exc))
    customer.search_text = build_search_text(
        customer.first_name, customer.last_name, customer.email, customer.phone
    )


def _check_required(customer: Customer, bag: ErrorBag) -> None:
    # A field already rejected as invalid is not also reported as missing.
    if not customer.first_name and "first_name" not in bag.errors:
        bag.add("first_name", "can't be blank")
    if not customer.email and not customer.phone and not {"email", "phone"} & bag.errors.keys():
        bag.add("base", "email or phone is required")


def _check_unique(session: Session, customer: Customer, bag: ErrorBag) -> None:
    """Email and phone are unique per store (also enforced by constraints; this names the field)."""
    for name, column in (("email", Customer.email), ("phone", Customer.phone)):
        value = getattr(customer, name)
        if not value:
            continue
        query = select(Customer.id).where(Customer.store_id == customer.store_id, column == value)
        if customer.id is not None:
            query = query.where(Customer.id != customer.id)
        with session.no_autoflush:  # flushing the value being checked would fail, not tell
            taken = session.scalar(query.limit(1)) is not None
        if taken:
            bag.add(name, "has already been taken")


def _store(session: Session, store_id: int) -> Store:
    store = session.get(Store, store_id)
    if store is None:
        raise NotFound("Store")
    return store


def get_customer(session: Session, *, store_id: int, customer_id: int) -> Customer:
    if not is_valid_id(customer_id):  # e.g. 10**30 from a URL: no such row, not a DB error
        raise NotFound("Customer")
    customer = session.scalar(
        select(Customer).where(Customer.store_id == store_id, Customer.id == customer_id)
    )
    if customer is None:
        raise NotFound("Customer")
    return customer


def customers_for_references(
    session: Session, *, store_id: int, references: Sequence[ReferenceInput]
) -> dict[tuple[str, str], ExternalReference]:
    """The existing references among `references`, keyed by (source, external_id)."""
    if not references:
        return {}
    pairs = [(r.source, r.external_id) for r in references]
    rows = session.scalars(
        select(ExternalReference).where(
            ExternalReference.store_id == store_id,
            tuple_(ExternalReference.source, ExternalReference.external_id).in_(pairs),
        )
    ).all()
    return {(r.source, r.external_id): r for r in rows}


def _upsert_references(
    session: Session,
    customer: Customer,
    references: Sequence[ReferenceInput],
    existing: Mapping[tuple[str, str], ExternalReference],
    bag: ErrorBag,
) -> None:
    for ref in references:
        row = existing.get((ref.source, ref.external_id))
        if row is None:
            row = ExternalReference(
                store_id=customer.store_id,
                customer=customer,
                source=ref.source,
                external_id=ref.external_id,
                metadata_={},
            )
            session.add(row)
        elif row.customer_id != customer.id:
            bag.add(
                "external_references",
                f"{ref.source}/{ref.external_id} already belongs to customer {row.customer_id}",
            )
            continue
        try:
            row.metadata_ = merge_metadata(row.metadata_, ref.metadata)
        except FieldError as exc:
            bag.add("external_references", f"{ref.source}/{ref.external_id}: metadata {exc}")


def _explain_conflict(session: Session, wanted: Customer) -> None:
    """A unique violation raced in by a concurrent writer becomes a 422 naming the field."""
    bag = ErrorBag()
    _check_unique(session, wanted, bag)
    bag.raise_if_any()


@dataclass(slots=True)
class UpsertResult:
    customer: Customer
    created: bool


def create_customer(
    session: Session,
    *,
    store_id: int,
    fields: CustomerFields,
    references: Sequence[ReferenceInput] = (),
) -> UpsertResult:
    """Create a customer, or update the one its references already point to.

    Creating with references that exist is an upsert on their customer ("safe to call with the
    same references twice"); references pointing at two different customers are a conflict.
    """
    store = _store(session, store_id)
    for attempt in range(3):
        existing = customers_for_references(session, store_id=store_id, references=references)
        owners = sorted({row.customer_id for row in existing.values()})
        if len(owners) > 1:
            listed = ", ".join(
                f"{s}/{e} → customer {row.customer_id}" for (s, e), row in sorted(existing.items())
            )
            raise ValidationFailed.single(
                "external_references", f"refer to different customers ({listed})"
            )
        if owners:
            customer = get_customer(session, store_id=store_id, customer_id=owners[0])
            return UpsertResult(
                customer=update_customer(
                    session,
                    store_id=store_id,
                    customer=customer,
                    fields=fields,
                    references=references,
                ),
                created=False,
            )
        bag = ErrorBag()
        norm = _normalise(fields, region=store.country, bag=bag)
        customer = Customer(store_id=store_id, metadata_={}, state="active")
        _apply(customer, norm, bag)
        _check_required(customer, bag)
        _check_unique(session, customer, bag)
        # A concurrent create with our references may have committed since we looked.
        if (
            bag
            and attempt < 2
            and customers_for_references(session, store_id=store_id, references=references)
        ):
            continue
        bag.raise_if_any()
        try:
            # A savepoint, so that losing a race on a reference (a concurrent create with the
            # same references committed first) retries as an upsert instead of failing.
            with session.begin_nested():
                session.add(customer)
                _upsert_references(session, customer, references, {}, bag)
                bag.raise_if_any()  # inside the savepoint: a rejected create leaves no rows
                session.flush()
        except IntegrityError:
            # The savepoint's rollback expunged the pending rows; look again from scratch.
            if attempt == 2:
                raise
            # If the winner created our references, retry as an upsert on its customer (even
            # when our insert failed on its email/phone first); otherwise name the taken field.
            if not customers_for_references(session, store_id=store_id, references=references):
                bag = ErrorBag()
                _check_unique(session, customer, bag)
                bag.raise_if_any()
            continue
        bag.raise_if_any()
        return UpsertResult(customer=customer, created=True)
    raise AssertionError("unreachable")  # pragma: no cover


def update_customer(
    session: Session,
    *,
    store_id: int,
    customer: Customer,
    fields: CustomerFields,
    references: Sequence[ReferenceInput] = (),
) -> Customer:
    """Partial update: sent fields replace, metadata is shallow-merged, references upserted."""
    store = _store(session, store_id)
    bag = ErrorBag()
    norm = _normalise(fields, region=store.country, bag=bag)
    if fields.first_name is not UNSET and norm.values.get("first_name", "") is None:
        bag.add("first_name", "can't be blank")
    bag.raise_if_any()
    # The changes are made inside a savepoint (`begin_nested` flushes what is already pending
    # *before* it opens one): an invalid update or a unique violation raced in by a concurrent
    # writer rolls back to here, leaving the customer and the transaction as they were.
    wanted = Customer(  # the email/phone asked for, to name them after a rollback
        id=customer.id,
        store_id=store_id,
        email=norm.values.get("email", customer.email),
        phone=norm.values.get("phone", customer.phone),
    )
    savepoint = session.begin_nested()
    try:
        # No autoflush while checking: a query would flush the unchecked changes (e.g. a taken
        # email) and fail with an IntegrityError instead of naming the field.
        with session.no_autoflush:
            _apply(customer, norm, bag)
            _check_required(customer, bag)
            _check_unique(session, customer, bag)
            existing = customers_for_references(session, store_id=store_id, references=references)
            _upsert_references(session, customer, references, existing, bag)
        bag.raise_if_any()
        session.flush()
    except IntegrityError:
        savepoint.rollback()
        _explain_conflict(session, wanted)
        raise
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return customer


@dataclass(slots=True)
class Page:
    items: list[Customer]
    page: int
    per_page: int
    total_count: int

    @property
    def total_pages(self) -> int:
        return max(1, math.ceil(self.total_count / self.per_page))


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _search_ids(store_id: int, term: str) -> Any:
    """Ids of live customers matching `term`, as one UNION (each arm uses its own index).

    Every arm applies the store and liveness filter itself, so the result needs no second pass
    over `customers` (which the planner may do as a sequential scan for large match sets).
    """
    lowered = term.strip().lower()
    text_match: ColumnElement[bool] = Customer.search_text.like(_like_pattern(lowered), escape="\\")
    digits = phone_digits(term)
    if digits and len(digits) >= 3 and digits != lowered and not any(ch.isalpha() for ch in term):
        text_match = or_(text_match, Customer.search_text.like(_like_pattern(digits), escape="\\"))
    live = and_(Customer.store_id == store_id, Customer.state.not_in(HIDDEN_STATES))
    arms = [
        select(Customer.id.label("id")).where(live, text_match),
        select(CustomerCard.customer_id.label("id"))
        .join(Customer, Customer.id == CustomerCard.customer_id)
        .where(CustomerCard.store_id == store_id, CustomerCard.code == term.strip(), live),
        select(ExternalReference.customer_id.label("id"))
        .join(Customer, Customer.id == ExternalReference.customer_id)
        .where(
            ExternalReference.store_id == store_id,
            ExternalReference.external_id == term.strip(),
            live,
        ),
    ]
    return union(*arms)


# A listed customer's references and cards come in the same query (not in one query each).
_PAGE_LOADS = (joinedload(Customer.external_references), joinedload(Customer.customer_cards))


def list_customers(
    session: Session,
    *,
    store_id: int,
    search: str | None = None,
    source: str | None = None,
    external_id: str | None = None,
    page: int = 1,
    per_page: int = 20,
) -> Page:
    """List live customers, filtered by a search term or an exact external reference."""
    for name, value in (("search", search), ("source", source), ("external_id", external_id)):
        if value is not None:
            try:
                check_text(value)
            except FieldError as exc:
                raise ValidationFailed.single(name, str(exc)) from None
    offset = (page - 1) * per_page
    if source is not None or external_id is not None:
        if source is None or external_id is None:
            raise ValidationFailed.single(
                "source" if source is None else "external_id",
                "must be given together with " + ("external_id" if source is None else "source"),
            )
        # (store, source, external_id) is unique: at most one customer, so a single query
        # gives both the page and the count.
        found = (
            session.execute(
                select(Customer)
                .join(ExternalReference, ExternalReference.customer_id == Customer.id)
                .where(
                    ExternalReference.store_id == store_id,
                    ExternalReference.source == source,
                    ExternalReference.external_id == external_id,
                )
                .options(*_PAGE_LOADS)
            )
            .unique()
            .scalars()
            .all()
        )
        items = list(found[offset : offset + per_page])
        return Page(items=items, page=page, per_page=per_page, total_count=len(found))
    if search is None or not search.strip():
        live = (Customer.store_id == store_id, Customer.state.not_in(HIDDEN_STATES))
        total = int(session.scalar(select(func.count()).select_from(Customer).where(*live)) or 0)
        rows = (
            session.execute(
                select(Customer)
                .where(*live)
                .options(*_PAGE_LOADS)
                .order_by(Customer.id)
                .offset(offset)
                .limit(per_page)
            )
            .unique()
            .scalars()
            .all()
        )
        return Page(items=list(rows), page=page, per_page=per_page, total_count=total)
    # A search is one query: the page of matching ids with the count of all matches (a window
    # over the match set, computed once), joined to their customers.
    ids = _search_ids(store_id, search).subquery()
    page_ids = (
        select(ids.c.id, func.count().over().label("total"))
        .order_by(ids.c.id)
        .offset(offset)
        .limit(per_page)
        .subquery()
    )
    result = (
        session.execute(
            select(Customer, page_ids.c.total)
            .join(page_ids, Customer.id == page_ids.c.id)
            .options(*_PAGE_LOADS)
            .order_by(Customer.id)
        )
        .unique()
        .all()
    )
    if result:
        total = int(result[0].total)
    elif page == 1:
        total = 0
    else:  # past the last page: the window had no row to report the count on
        total = int(session.scalar(select(func.count()).select_from(ids)) or 0)
    return Page(items=[row[0] for row in result], page=page, per_page=per_page, total_count=total)


def find_by_reference(
    session: Session, *, store_id: int, source: str, external_id: str
) -> Customer | None:
    return session.scalar(
        select(Customer)
        .join(ExternalReference, ExternalReference.customer_id == Customer.id)
        .where(
            and_(
                ExternalReference.store_id == store_id,
                ExternalReference.source == source,
                ExternalReference.external_id == external_id,
            )
        )
    )
