"""Bulk, identity-resolving upsert of foreign customer records, one page at a time.

A page (up to a few hundred `ForeignCustomer`s) is applied as a set, in the caller's
transaction — the caller saves the page's sync cursor in the same transaction and commits, so a
crash resumes at the page it died on. Per page, whatever its size:

1. one query for the page's references (and the merge targets they name);
2. records whose content hash equals the reference's are *unchanged* and cost nothing more (a
   newer source version/timestamp on the same content is still recorded, in bulk); older ones
   are *stale* (Square `version`, else `source_updated_at`, compared as instants);
3. the rest are normalised (E.164 phones, lower-cased emails, year-less birthdays) and resolved:
   an existing reference wins; else the customer holding the normalised email, else the one
   holding the phone (`IngestPolicy.match_by`) gets a new reference (*linked*); else a customer
   is *created*. One query finds those owners for the whole page; customers created earlier in
   the page are matched too;
4. writes are multi-row statements: new customers (INSERT … RETURNING), changed customers (one
   executemany UPDATE by id), new references (INSERT) and changed references (UPDATE by id; on
   PostgreSQL the metadata is merged in SQL, `metadata || patch`).

Rules:

- Absent fields never clear data; a source only overwrites the fields it owns
  (`IngestPolicy.owned_fields`). The loyalty data (cards, ledger) is never touched by a sync;
  the local `excluded` state only by a source that says so (`EXCLUDED_ATTRIBUTE`).
- A record without a reference of its own is first resolved through its alias source
  (`IngestPolicy.alias_for`: Appy Stamp ids are Shopify ids), then by email/phone.
- A record with neither a usable email nor phone, or whose email and phone belong to two
  different customers, or whose new email/phone belongs to another customer, is not written: it
  is recorded in `sync_conflicts` (kind, source, external id, the customers involved — no PII)
  for the operator, and resolved automatically once a later version of it can be written.
- A missing first name falls back to the nickname, then the company name, then the local part
  of the email — only when the customer has no first name yet.
- A source delete (`deleted`) tombstones the reference (`deleted_at`) and keeps the customer and
  its loyalty history. A record whose customer was erased (`redacted`) is *suppressed*: an
  erased person never comes back. `merged_into` merges the record's customer into the target
  record's customer (see `models.lifecycle.merge_customers`).

Concurrency: on PostgreSQL the page takes a transaction-scoped advisory lock per store, so
concurrent pages (workers, webhook batches) of one store resolve identities one after the
other and can never create two customers for one person; SQLite serialises writers anyway
(`BEGIN IMMEDIATE`). A unique violation raced in by a writer that does not take the lock (the
REST API) rolls the page back to its savepoint and the page is planned again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

import structlog
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectors.records import ForeignCustomer
from models import ingest_sql as sql
from models import lifecycle
from models.normalize import (
    METADATA_MAX_BYTES,
    NAME_MAX,
    FieldError,
    build_search_text,
    normalise_email,
    normalise_phone,
    parse_birthday,
)
from models.tables import ExternalReference, Store, utcnow

log = structlog.get_logger(__name__)

OWNABLE_FIELDS: Final = frozenset({"first_name", "last_name", "email", "phone", "birthday"})
MATCH_KEYS: Final = ("email", "phone")
ADVISORY_LOCK_CLASS: Final = 0x4C53  # "LS": the ingest lock namespace (pg_advisory_xact_lock)
MAX_ATTEMPTS: Final = 3
# The state of a customer that only holds the tombstone of a record deleted before it arrived.
DELETED: Final = "deleted"
EXCLUDED_ATTRIBUTE: Final = sql.EXCLUDED_KEY
"""Reserved `ForeignCustomer.attributes` key: True when the source removed the customer from its
loyalty program (Appy Stamp `state` removed/excluded), False when it says they take part, absent
(None) when it says nothing. True makes an active local customer `excluded` (no earning); False
re-includes a locally `excluded` customer only when this same reference had excluded them (a
merchant's own exclusion is never undone by a sync). Kept in the reference metadata like every
attribute."""
SOURCE_ALIASES: Final[Mapping[str, str]] = {"appystamp": "shopify"}
"""Sources whose external ids are another source's ids for the same person (Appy Stamp's
customer id IS the Shopify customer id): the alias source consulted when the policy names none."""


@dataclass(frozen=True, slots=True)
class IngestPolicy:
    """How one connection's records are applied.

    `owned_fields`: the customer fields this source may overwrite on an existing customer
    (default: every field it sends). `match_by`: the keys tried, in order, when a record has no
    reference yet (LOKE: email only — its phones are not unique). `alias_source`: a source whose
    reference with the record's own external id identifies the same person; consulted after the
    record's own reference and before email/phone matching (None: `SOURCE_ALIASES` of the
    record's source, e.g. Appy Stamp → shopify). It is not part of the content hash.
    """

    owned_fields: frozenset[str] = OWNABLE_FIELDS
    match_by: tuple[str, ...] = MATCH_KEYS
    alias_source: str | None = None

    def alias_for(self, source: str) -> str | None:
        """The alias source consulted for records of `source` (never the source itself)."""
        alias = self.alias_source or SOURCE_ALIASES.get(source)
        return alias if alias != source else None

    def __post_init__(self) -> None:
        if unknown := set(self.owned_fields) - OWNABLE_FIELDS:
            raise ValueError(f"unknown owned fields: {', '.join(sorted(unknown))}")
        if not self.match_by or set(self.match_by) - set(MATCH_KEYS):
            raise ValueError("match_by must name email and/or phone")


@dataclass(slots=True)
class PageCounts:
    """What applying records did (or, in a dry run, would do)."""

    seen: int = 0
    created: int = 0
    updated: int = 0
    linked: int = 0
    unchanged: int = 0
    conflicts: int = 0
    deleted: int = 0
    merged: int = 0
    stale: int = 0
    suppressed: int = 0  # records of erased (redacted) people: never brought back

    def add(self, other: PageCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- preparing records ----------------------------------------------------------------------


def content_hash(record: ForeignCustomer, policy: IngestPolicy) -> str:
    """A digest of everything a record would write (and of the policy that decides it).

    The `repr` of plain values (str, int, bool, None, lists, the attributes' items sorted by
    key) is deterministic and several times cheaper than canonical JSON; a nested object whose
    keys come in another order only costs one redundant (idempotent) update.
    """
    payload = (
        record.first_name,
        record.last_name,
        record.email,
        record.phone,
        record.birthday,
        record.nickname,
        record.company_name,
        record.deleted,
        record.merged_into,
        tuple(sorted(policy.owned_fields)),  # a frozenset repr varies with hash seeding
        policy.match_by,
        sorted(record.attributes.items()),
    )
    encoded = repr(payload).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def changed_records(
    session: Session,
    *,
    store_id: int,
    records: Sequence[ForeignCustomer],
    policy: IngestPolicy = IngestPolicy(),
) -> list[ForeignCustomer]:
    """The records of a page that `apply_customer_page` would not skip as unchanged: new
    references, or a content hash (or deleted state) different from what the reference holds.

    For a source that fetches extra data per changed customer (LOKE memberships, Appy Stamp
    activities) before or after applying the page; stale records are not filtered out here.
    """
    if not records:
        return []
    keys = {(r.source, r.external_id) for r in records}
    rows = session.execute(
        select(
            ExternalReference.source,
            ExternalReference.external_id,
            ExternalReference.content_hash,
            ExternalReference.deleted_at,
        ).where(
            ExternalReference.store_id == store_id,
            ExternalReference.source.in_({source for source, _ in keys}),
            ExternalReference.external_id.in_({external_id for _, external_id in keys}),
        )
    ).all()
    known = {(row.source, row.external_id): (row.content_hash, row.deleted_at) for row in rows}
    changed = []
    for record in records:
        seen = known.get((record.source, record.external_id))
        if seen is None:
            changed.append(record)
            continue
        stored_hash, deleted_at = seen
        if stored_hash != content_hash(record, policy) or (deleted_at is None) == record.deleted:
            changed.append(record)
    return changed


def _text(value: str | None, limit: int = NAME_MAX) -> str | None:
    """Source text the databases can store: no NUL, valid UTF-8, at most `limit` characters."""
    if value is None:
        return None
    cleaned = value.replace("\x00", "")
    cleaned = cleaned.encode("utf-8", "replace").decode("utf-8").strip()[:limit].strip()
    return cleaned or None


def _attributes(record: ForeignCustomer) -> dict[str, Any]:
    """The reference-metadata patch: None values dropped (absent never clears), text made
    storable, size-capped (a source with thousands of tags must not break the page)."""
    patch, size = _storable({str(k): v for k, v in record.attributes.items() if v is not None})
    budget = METADATA_MAX_BYTES // 2
    if size <= budget:
        return patch
    kept: dict[str, Any] = {}
    dropped = []
    for key, value in sorted(patch.items(), key=lambda kv: _size(kv[1])):
        if _size({**kept, key: value}) <= budget:
            kept[key] = value
        else:
            dropped.append(key)
    log.warning(
        "ingest.attributes.truncated",
        source=record.source,
        external_id=record.external_id,
        dropped=dropped,
    )
    return kept


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, default=str).encode())


def _storable(patch: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """JSON both databases accept (no NUL characters, no lone surrogates) and its size."""
    encoded = json.dumps(patch, ensure_ascii=False, default=str)
    try:
        data = encoded.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        if "\\u0000" not in encoded:
            return patch, len(data)
    cleaned = encoded.encode("utf-8", "replace").decode("utf-8").replace("\\u0000", "")
    result: dict[str, Any] = json.loads(cleaned)
    return result, len(cleaned.encode("utf-8"))


@dataclass(slots=True)
class _Prepared:
    """A record's values in the store's terms (None = absent)."""

    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    birthday: tuple[int | None, int, int] | None  # (year, month, day)
    fallback_first_name: str | None
    raw_phone: str | None  # kept in metadata when the phone can't be written (not unique)


def _prepare(record: ForeignCustomer, region: str) -> _Prepared:
    email = phone = None
    if record.email:
        try:
            email = normalise_email(record.email)
        except FieldError:
            log.info("ingest.field.invalid", source=record.source, field="email")
    if record.phone:
        try:
            phone = normalise_phone(record.phone, region)
        except FieldError:
            log.info("ingest.field.invalid", source=record.source, field="phone")
    birthday = None
    if record.birthday:
        try:
            parsed = parse_birthday(record.birthday)
            birthday = (parsed.year, parsed.month, parsed.day)
        except FieldError:
            log.info("ingest.field.invalid", source=record.source, field="birthday")
    fallback = _text(record.nickname) or _text(record.company_name)
    if fallback is None and email is not None:
        fallback = _text(email.split("@", 1)[0])
    return _Prepared(
        first_name=_text(record.first_name),
        last_name=_text(record.last_name),
        email=email,
        phone=phone,
        birthday=birthday,
        fallback_first_name=fallback,
        raw_phone=_text(record.phone, 40),
    )


# --- the plan -------------------------------------------------------------------------------


@dataclass(slots=True)
class _RefRow:
    id: int
    customer_id: int
    content_hash: str | None
    source_version: int | None
    source_updated_at: dt.datetime | None
    deleted_at: dt.datetime | None
    metadata: dict[str, Any]
    was_excluded: bool = False  # the metadata's EXCLUDED_ATTRIBUTE was true


@dataclass(slots=True)
class _CustomerRow:
    """A customer as the page sees it (DB values, then the page's own changes)."""

    id: int | None  # None until inserted
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    birth_year: int | None
    birth_month: int | None
    birth_day: int | None
    state: str
    merged_into_id: int | None = None
    changed: bool = False
    new: bool = False
    key: int = 0  # position in the plan (new customers have no id yet)


@dataclass(slots=True)
class _RefWrite:
    record: ForeignCustomer
    customer: _CustomerRow
    existing: _RefRow | None
    hash: str | None
    metadata: dict[str, Any]
    deleted: bool


@dataclass(slots=True)
class _Conflict:
    source: str
    external_id: str
    kind: str
    detail: str
    customer_ids: list[int]


@dataclass(slots=True)
class _Plan:
    counts: PageCounts = field(default_factory=PageCounts)
    customers: dict[int, _CustomerRow] = field(default_factory=dict)  # by key
    ref_writes: list[_RefWrite] = field(default_factory=list)
    bumps: list[tuple[int, int | None, dt.datetime | None]] = field(default_factory=list)
    conflicts: list[_Conflict] = field(default_factory=list)
    merges: list[ForeignCustomer] = field(default_factory=list)
    written: list[tuple[str, str]] = field(default_factory=list)


def _newest(records: Iterable[ForeignCustomer]) -> list[ForeignCustomer]:
    """One record per external id: the newest (a page may repeat a record that changed)."""
    chosen: dict[tuple[str, str], ForeignCustomer] = {}
    for record in records:
        key = (record.source, record.external_id)
        previous = chosen.get(key)
        if previous is None or not _is_older(record, previous.version, previous.source_updated_at):
            chosen[key] = record
    return list(chosen.values())


def _is_older(record: ForeignCustomer, version: int | None, updated_at: dt.datetime | None) -> bool:
    """Whether `record` is older than what (version, updated_at) describes."""
    if record.version is not None and version is not None:
        return record.version < version
    if record.source_updated_at is not None and updated_at is not None:
        return record.source_updated_at < updated_at
    return False


def _is_newer(record: ForeignCustomer, version: int | None, updated_at: dt.datetime | None) -> bool:
    if record.version is not None and (version is None or record.version > version):
        return True
    return record.source_updated_at is not None and (
        updated_at is None or record.source_updated_at > updated_at
    )


class _Planner:
    def __init__(
        self, session: Session, store: Store, policy: IngestPolicy, now: dt.datetime
    ) -> None:
        self.session = session
        self.store = store
        self.policy = policy
        self.now = now
        self.plan = _Plan()
        self.dialect = session.get_bind().dialect.name
        self.by_id: dict[int, _CustomerRow] = {}
        self.email_owner: dict[str, _CustomerRow] = {}
        self.phone_owner: dict[str, _CustomerRow] = {}
        self._next_key = 0

    # -- loading -------------------------------------------------------------------------

    def load_references(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], _RefRow]:
        found = {}
        for row in sql.fetch_references(self.session, self.store.id, keys):
            mapping = row._mapping
            metadata = dict(mapping.get("metadata") or {})
            was_excluded = mapping.get("was_excluded")
            if was_excluded is None:  # SQLite: the whole metadata is here
                was_excluded = metadata.get(EXCLUDED_ATTRIBUTE) is True
            found[(row.source, row.external_id)] = _RefRow(
                id=row.id,
                customer_id=row.customer_id,
                content_hash=row.content_hash,
                source_version=row.source_version,
                source_updated_at=_aware(row.source_updated_at),
                deleted_at=_aware(row.deleted_at),
                metadata=metadata,
                was_excluded=bool(was_excluded),
            )
        return found

    def load_customers(
        self, ids: Iterable[int], emails: Iterable[str], phones: Iterable[str]
    ) -> None:
        """Load the customers the page may touch: by id, and the owners of its emails/phones."""
        rows = sql.fetch_customers(
            self.session, self.store.id, set(ids) - self.by_id.keys(), emails, phones
        )
        for row in rows:
            if row.id in self.by_id:
                continue
            customer = _CustomerRow(
                id=row.id,
                first_name=row.first_name,
                last_name=row.last_name,
                email=row.email,
                phone=row.phone,
                birth_year=row.birth_year,
                birth_month=row.birth_month,
                birth_day=row.birth_day,
                state=row.state,
                merged_into_id=row.merged_into_id,
            )
            self._register(customer)

    def _register(self, customer: _CustomerRow) -> None:
        customer.key = self._next_key
        self._next_key += 1
        self.plan.customers[customer.key] = customer
        if customer.id is not None:
            self.by_id[customer.id] = customer
        if customer.email:
            self.email_owner[customer.email] = customer
        if customer.phone:
            self.phone_owner[customer.phone] = customer

    def live(self, customer_id: int) -> _CustomerRow | None:
        """The customer a reference points to, following merges to the survivor."""
        seen: set[int] = set()
        customer = self.by_id.get(customer_id)
        while customer is not None and customer.state == "merged" and customer.merged_into_id:
            if customer.id in seen:
                break
            seen.add(customer.id or 0)
            target = customer.merged_into_id
            if target not in self.by_id:
                self.load_customers([target], (), ())
            customer = self.by_id.get(target)
        return customer

    # -- deciding ------------------------------------------------------------------------

    def conflict(
        self, record: ForeignCustomer, kind: str, detail: str, ids: Iterable[int | None]
    ) -> None:
        self.plan.conflicts.append(
            _Conflict(
                source=record.source,
                external_id=record.external_id,
                kind=kind,
                detail=detail,
                customer_ids=sorted({i for i in ids if i is not None}),
            )
        )
        self.plan.counts.conflicts += 1

    def taken(self, customer: _CustomerRow, prepared: _Prepared) -> tuple[str, _CustomerRow] | None:
        """A contact value of the record held by a different customer, if any."""
        for name, owners in (("email", self.email_owner), ("phone", self.phone_owner)):
            value = getattr(prepared, name)
            if value is None or name not in self.policy.owned_fields:
                continue
            if name not in self.policy.match_by:
                continue  # not identity for this source: `apply_fields` keeps it aside
            if getattr(customer, name) == value:
                continue
            owner = owners.get(value)
            if owner is not None and owner is not customer:
                return name, owner
        return None

    def apply_fields(
        self, customer: _CustomerRow, prepared: _Prepared, *, new: bool
    ) -> dict[str, Any]:
        """Write the record's values onto `customer` (owned fields only; absent never clears).

        Returns the extra reference metadata (a phone that could not be written).
        """
        owned = OWNABLE_FIELDS if new else self.policy.owned_fields
        extra: dict[str, Any] = {}
        values: dict[str, Any] = {}
        if "first_name" in owned and prepared.first_name is not None:
            values["first_name"] = prepared.first_name
        elif not customer.first_name and prepared.fallback_first_name is not None:
            values["first_name"] = prepared.fallback_first_name
        if "last_name" in owned and prepared.last_name is not None:
            values["last_name"] = prepared.last_name
        if "email" in owned and prepared.email is not None:
            values["email"] = prepared.email
        if "phone" in owned and prepared.phone is not None:
            owner = self.phone_owner.get(prepared.phone)
            if owner is not None and owner is not customer:
                # Only reachable when phones are not identity (match_by without phone): the
                # number stays on the reference, the other customer keeps it.
                extra["phone"] = prepared.raw_phone
            else:
                values["phone"] = prepared.phone
        if "birthday" in owned and prepared.birthday is not None:
            year, month, day = prepared.birthday
            values.update(birth_year=year, birth_month=month, birth_day=day)
        for name, value in values.items():
            if getattr(customer, name) != value:
                if name == "email" and customer.email:
                    self.email_owner.pop(customer.email, None)
                if name == "phone" and customer.phone:
                    self.phone_owner.pop(customer.phone, None)
                setattr(customer, name, value)
                customer.changed = True
        if customer.email:
            self.email_owner[customer.email] = customer
        if customer.phone:
            self.phone_owner[customer.phone] = customer
        return extra

    def match(
        self, record: ForeignCustomer, prepared: _Prepared
    ) -> tuple[_CustomerRow | None, bool]:
        """The customer to link a reference-less record to → (customer, ok).

        ok=False: a conflict was recorded and the record must not be written.
        """
        if prepared.email is None and prepared.phone is None:
            self.conflict(record, "no_contact", "the record has no usable email or phone", ())
            return None, False
        by_email = self.email_owner.get(prepared.email) if prepared.email else None
        by_phone = self.phone_owner.get(prepared.phone) if prepared.phone else None
        candidates = {"email": by_email, "phone": by_phone}
        matches = [candidates[k] for k in self.policy.match_by if candidates[k] is not None]
        if (
            by_email is not None
            and by_phone is not None
            and by_email is not by_phone
            and "phone" in self.policy.match_by
        ):
            self.conflict(
                record,
                "email_phone_split",
                "the email belongs to one customer and the phone to another",
                (by_email.id, by_phone.id),
            )
            return None, False
        return (matches[0] if matches else None), True

    def new_customer(self, state: str = "active") -> _CustomerRow:
        customer = _CustomerRow(
            id=None,
            first_name=None,
            last_name=None,
            email=None,
            phone=None,
            birth_year=None,
            birth_month=None,
            birth_day=None,
            state=state,
            changed=True,
            new=True,
        )
        self._register(customer)
        return customer


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _triage(
    plan: _Plan,
    records: Sequence[ForeignCustomer],
    refs: Mapping[tuple[str, str], _RefRow],
    policy: IngestPolicy,
) -> list[tuple[ForeignCustomer, _RefRow | None, str]]:
    """Cheap decisions first: stale and unchanged records are never normalised."""
    todo: list[tuple[ForeignCustomer, _RefRow | None, str]] = []
    for record in records:
        ref = refs.get((record.source, record.external_id))
        digest = content_hash(record, policy)
        if ref is not None:
            if _is_older(record, ref.source_version, ref.source_updated_at):
                plan.counts.stale += 1
                continue
            if ref.content_hash == digest and (ref.deleted_at is None) != record.deleted:
                plan.counts.unchanged += 1
                if _is_newer(record, ref.source_version, ref.source_updated_at):
                    plan.bumps.append((ref.id, record.version, record.source_updated_at))
                continue
        todo.append((record, ref, digest))
    return todo


def _apply_exclusion(customer: _CustomerRow, record: ForeignCustomer, ref: _RefRow | None) -> None:
    """The source's program exclusion (`EXCLUDED_ATTRIBUTE`) onto the local state.

    Only `active` ↔ `excluded` moves: merged, redacted and placeholder customers stay as they
    are, and a re-inclusion needs this reference to have been the one that excluded them.
    """
    excluded = record.attributes.get(EXCLUDED_ATTRIBUTE)
    if excluded is True and customer.state == "active":
        customer.state = "excluded"
        customer.changed = True
    elif (
        excluded is False and customer.state == "excluded" and ref is not None and ref.was_excluded
    ):
        customer.state = "active"
        customer.changed = True


def _alias_customer(planner: _Planner, alias: _RefRow | None) -> tuple[_CustomerRow | None, bool]:
    """The live customer an alias reference names → (customer, suppressed).

    A placeholder (the tombstone of a record deleted before it arrived) is no person: ignored.
    """
    if alias is None:
        return None, False
    customer = planner.live(alias.customer_id)
    if customer is None or customer.state == DELETED:
        return None, False
    if customer.state == "redacted":
        return None, True
    return customer, False


def _decide(
    planner: _Planner,
    record: ForeignCustomer,
    ref: _RefRow | None,
    digest: str,
    values: _Prepared | None,
    alias: _RefRow | None = None,
) -> None:
    """Plan one changed record: update, link, create, tombstone, suppress or conflict.

    `alias` is the reference of the policy's alias source with the record's external id (only
    looked at when the record has no reference of its own): the customer it names is linked
    before any email/phone match is tried.
    """
    plan = planner.plan
    if record.merged_into:
        plan.merges.append(record)
        if ref is None:
            # Never create a customer for a record that no longer exists on its own: the merge
            # (after the writes) points its id at the survivor.
            plan.counts.unchanged += 1
            return
    customer = planner.live(ref.customer_id) if ref is not None else None
    if ref is not None and customer is None:  # pragma: no cover - the foreign key forbids it
        raise RuntimeError("reference without a customer")
    if customer is not None and customer.state == "redacted":
        plan.counts.suppressed += 1
        return
    attributes = _attributes(record)
    if record.deleted or values is None:
        if ref is None or customer is None:
            if record.version is None and record.source_updated_at is None:
                plan.counts.unchanged += 1  # nothing here to delete, nothing to date it by
                return
            # A delete that overtook its create (webhooks arrive out of order): remember it, so
            # the late create, older than the delete, is stale instead of bringing it back.
            customer = planner.new_customer(state=DELETED)
        plan.ref_writes.append(_RefWrite(record, customer, ref, digest, attributes, deleted=True))
        if ref is None or ref.deleted_at is None:
            plan.counts.deleted += 1
        else:
            plan.counts.unchanged += 1
        return
    placeholder = None
    if customer is not None and customer.state == DELETED:
        # Newer than the delete that was remembered without a customer: a person after all.
        placeholder, customer = customer, None
    found = customer
    if found is None and ref is None:
        found, suppressed = _alias_customer(planner, alias)
        if suppressed:
            plan.counts.suppressed += 1
            return
    if found is None:
        matched, ok = planner.match(record, values)
        if not ok:
            return
        found = matched
    if found is not None and (taken := planner.taken(found, values)) is not None:
        name, owner = taken
        planner.conflict(
            record,
            f"{name}_taken",
            f"its {name} belongs to another customer",
            (found.id, owner.id),
        )
        return
    if found is not None:
        target = found
    elif placeholder is not None:
        target = placeholder
        target.state = "active"
        target.changed = True
    else:
        target = planner.new_customer()
    extra = planner.apply_fields(target, values, new=found is None)
    _apply_exclusion(target, record, ref)
    plan.ref_writes.append(
        _RefWrite(record, target, ref, digest, {**attributes, **extra}, deleted=False)
    )
    _count_write(plan, record, updated=customer is not None, linked=found is not None)


def _count_write(plan: _Plan, record: ForeignCustomer, *, updated: bool, linked: bool) -> None:
    if updated:
        plan.counts.updated += 1
    elif linked:
        plan.counts.linked += 1
    else:
        plan.counts.created += 1
    plan.written.append((record.source, record.external_id))


def _plan_page(
    session: Session,
    store: Store,
    records: Sequence[ForeignCustomer],
    policy: IngestPolicy,
    now: dt.datetime,
) -> _Plan:
    planner = _Planner(session, store, policy, now)
    plan = planner.plan
    plan.counts.seen = len(records)
    unique = _newest(records)
    plan.counts.unchanged += len(records) - len(unique)  # older copies of a record in the page
    keys = {(r.source, r.external_id) for r in unique}
    keys |= {(r.source, r.merged_into) for r in unique if r.merged_into}
    # Alias references (Appy Stamp id = Shopify id) come with the page's own: one query.
    aliases = {
        (alias, r.external_id)
        for r in unique
        if not r.deleted and (alias := policy.alias_for(r.source)) is not None
    }
    refs = planner.load_references(keys | aliases)
    todo = _triage(plan, unique, refs, policy)
    prepared = {id(r): _prepare(r, store.country) for r, _, _ in todo if not r.deleted}

    def alias_of(record: ForeignCustomer, ref: _RefRow | None) -> _RefRow | None:
        source = policy.alias_for(record.source)
        if ref is not None or record.deleted or source is None:
            return None
        return refs.get((source, record.external_id))

    linked = {id(r): a for r, ref, _ in todo if (a := alias_of(r, ref)) is not None}
    planner.load_customers(
        [
            *(ref.customer_id for _, ref, _ in todo if ref is not None),
            *(a.customer_id for a in linked.values()),
        ],
        (p.email for p in prepared.values() if p.email),
        (p.phone for p in prepared.values() if p.phone),
    )
    for record, ref, digest in todo:
        _decide(planner, record, ref, digest, prepared.get(id(record)), linked.get(id(record)))
    return plan


# --- writing --------------------------------------------------------------------------------


def _customer_values(customer: _CustomerRow) -> dict[str, Any]:
    return {
        "first_name": customer.first_name,
        "last_name": customer.last_name,
        "email": customer.email,
        "phone": customer.phone,
        "birth_year": customer.birth_year,
        "birth_month": customer.birth_month,
        "birth_day": customer.birth_day,
        "search_text": build_search_text(
            customer.first_name, customer.last_name, customer.email, customer.phone
        ),
        "state": customer.state,
    }


def _write(session: Session, store_id: int, plan: _Plan, now: dt.datetime) -> None:
    postgres = sql.is_postgres(session)
    new = [c for c in plan.customers.values() if c.new]
    ids = sql.insert_customers(session, store_id, [_customer_values(c) for c in new], now)
    for customer, new_id in zip(new, ids, strict=True):
        customer.id = new_id
    sql.update_customers(
        session,
        [
            {"id": c.id, **_customer_values(c)}
            for c in plan.customers.values()
            if c.changed and not c.new
        ],
        now,
    )
    sql.insert_references(
        session,
        store_id,
        [
            {
                "customer_id": w.customer.id,
                "source": w.record.source,
                "external_id": w.record.external_id,
                "metadata": w.metadata,
                "source_updated_at": w.record.source_updated_at,
                "source_version": w.record.version,
                "content_hash": w.hash,
                "deleted_at": now if w.deleted else None,
            }
            for w in plan.ref_writes
            if w.existing is None
        ],
        now,
    )
    updates = []
    for w in plan.ref_writes:
        if w.existing is None:
            continue
        updates.append(
            {
                "id": w.existing.id,
                # PostgreSQL merges the patch in SQL; SQLite (one writer) gets the merged object.
                "patch": w.metadata if postgres else {**w.existing.metadata, **w.metadata},
                "customer_id": w.customer.id,
                "content_hash": w.hash,
                "source_version": _max(w.record.version, w.existing.source_version),
                "source_updated_at": _max(w.record.source_updated_at, w.existing.source_updated_at),
                "deleted_at": (w.existing.deleted_at or now) if w.deleted else None,
            }
        )
    sql.update_references(session, updates, now)
    sql.bump_references(session, plan.bumps)
    sql.record_conflicts(
        session,
        store_id,
        [
            {
                "source": c.source,
                "external_id": c.external_id,
                "kind": c.kind,
                "detail": c.detail,
                "customer_ids": c.customer_ids,
            }
            for c in plan.conflicts
        ],
        now,
    )
    sql.resolve_conflicts(session, store_id, plan.written, now)


def _max(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def lock_store(session: Session, store_id: int) -> None:
    """Serialise identity resolution per store until the transaction ends (PostgreSQL)."""
    if sql.is_postgres(session):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:cls, :obj)"),
            {"cls": ADVISORY_LOCK_CLASS, "obj": store_id % 2_147_483_647},
        )


def prefer_index_probes(session: Session) -> None:
    """On PostgreSQL, plan this page's statements with index probes only.

    Every look-up of a page is a probe of a unique index, but right after a bulk load the table
    statistics still say "empty", and the planner then prefers scanning the table once per key
    (a 10k-customer first load measured 0.3 s per page that way). The same stale statistics
    make a prepared statement's generic plan a scan, hence custom plans. Both settings are
    transaction-local (`set_config(..., true)`) and suit the caller's remaining statements in
    the page's transaction too, which are look-ups by key.
    """
    if sql.is_postgres(session):
        session.execute(
            text(
                "SELECT set_config('enable_seqscan', 'off', true),"
                " set_config('plan_cache_mode', 'force_custom_plan', true)"
            )
        )


def prefer_cached_plans(session: Session) -> None:
    """Back to PostgreSQL's default plan caching for the rest of the transaction (after
    `prefer_index_probes`, before bulk writes).

    Every foreign key is checked per written row by a cached query: under
    `force_custom_plan` each of those checks is planned anew, which measured 2.5 times the cost of
    an insert (16,000 outbox rows: 777 ms against 309 ms).
    """
    if sql.is_postgres(session):
        session.execute(text("SET LOCAL plan_cache_mode TO DEFAULT"))


def apply_customer_page(
    session: Session,
    *,
    store_id: int,
    records: Sequence[ForeignCustomer],
    policy: IngestPolicy = IngestPolicy(),
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> PageCounts:
    """Apply one page of records in the caller's transaction (the caller commits).

    `dry_run` plans the page (same queries, same counts) and writes nothing.
    """
    now = now or utcnow()
    store = session.get(Store, store_id)
    if store is None:
        raise LookupError(f"store {store_id} does not exist")
    if not records:
        return PageCounts()
    if not dry_run:
        lock_store(session, store_id)
    return _apply(session, store, records, policy, dry_run, now)


def _apply(
    session: Session,
    store: Store,
    records: Sequence[ForeignCustomer],
    policy: IngestPolicy,
    dry_run: bool,
    now: dt.datetime,
) -> PageCounts:
    store_id = store.id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        prefer_index_probes(session)  # the reads; `prefer_cached_plans` before the writes
        plan = _plan_page(session, store, records, policy, now)
        if dry_run:
            return plan.counts
        prefer_cached_plans(session)
        try:
            with session.begin_nested():
                _write(session, store_id, plan, now)
                for record in plan.merges:
                    if lifecycle.follow_merge(
                        session,
                        store_id=store_id,
                        source=record.source,
                        loser_external_id=record.external_id,
                        winner_external_id=record.merged_into or "",
                        now=now,
                    ):
                        plan.counts.merged += 1
        except IntegrityError:
            # A writer outside the ingest lock (the REST API) took an email/phone/reference
            # between our reads and writes: plan again from what is committed now.
            if attempt == MAX_ATTEMPTS:
                raise
            log.info("ingest.page.retry", store_id=store_id, attempt=attempt)
            continue
        return plan.counts
    raise AssertionError("unreachable")  # pragma: no cover
