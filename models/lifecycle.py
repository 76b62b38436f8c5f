"""Merges and erasure: the store operations behind source merges and GDPR redaction.

- `merge_customers(winner, loser)`: one person had two customers. The loser's references move to
  the winner; its card balances move with ledger entries on both sides (`merge_out` on the
  loser's card, `merge_in` on the winner's), or, for a card the winner does not hold, the card
  itself moves (its pass keeps working); contact fields the winner lacks are taken over; the
  loser is left `merged` (with `merged_into_id`) and holds no email/phone, so it can never be
  matched again. Never two live customers for one person.
- `follow_merge(source, loser id → winner id)`: the same, addressed by the source's ids.
- `erase_customer` (GDPR): wipes the customer's PII (and that of customers merged into it —
  the same person), keeps cards and ledger (counts, not people), and keeps the references as
  tombstones pointing at the `redacted` customer, so a later pull of the same external id is
  suppressed: the person never comes back.
- `erase_reference(source, external id)`: erasure by the source's id; for an id never seen, a
  PII-free `redacted` customer holds the tombstone reference.
"""

from __future__ import annotations

import datetime as dt

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.cards import _record
from models.normalize import build_search_text
from models.tables import Customer, CustomerCard, ExternalReference, utcnow

log = structlog.get_logger(__name__)

_CONTACT_FIELDS = ("email", "phone")
_OTHER_FIELDS = ("first_name", "last_name", "birth_year", "birth_month", "birth_day")


def _survivor(session: Session, customer: Customer) -> Customer:
    """Follow `merged_into_id` to the customer that holds the person now."""
    seen = {customer.id}
    while customer.state == "merged" and customer.merged_into_id is not None:
        target = session.get(Customer, customer.merged_into_id)
        if target is None or target.id in seen:
            break
        seen.add(target.id)
        customer = target
    return customer


def _reference(
    session: Session, *, store_id: int, source: str, external_id: str
) -> ExternalReference | None:
    return session.scalar(
        select(ExternalReference).where(
            ExternalReference.store_id == store_id,
            ExternalReference.source == source,
            ExternalReference.external_id == external_id,
        )
    )


def merge_customers(
    session: Session,
    *,
    store_id: int,
    winner_id: int,
    loser_id: int,
    now: dt.datetime | None = None,
) -> Customer:
    """Merge customer `loser_id` into `winner_id` (both followed to their survivors)."""
    now = now or utcnow()
    winner = session.get(Customer, winner_id)
    loser = session.get(Customer, loser_id)
    if winner is None or loser is None or {winner.store_id, loser.store_id} != {store_id}:
        raise LookupError("both customers must exist in the store")
    winner, loser = _survivor(session, winner), _survivor(session, loser)
    if winner.id == loser.id:
        return winner
    session.execute(
        update(ExternalReference)
        .where(ExternalReference.customer_id == loser.id)
        .values(customer_id=winner.id, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Customer)
        .where(Customer.merged_into_id == loser.id)
        .values(merged_into_id=winner.id)
        .execution_options(synchronize_session=False)
    )
    held = {cc.card_id: cc for cc in winner.customer_cards}
    for cc in list(loser.customer_cards):
        target = held.get(cc.card_id)
        if target is None:
            # The whole card moves; its wallet pass keeps working.
            loser.customer_cards.remove(cc)
            winner.customer_cards.append(cc)
            continue
        if cc.stamps > 0:
            moved = cc.stamps
            details = {"from_customer_id": loser.id, "to_customer_id": winner.id}
            _record(
                session,
                cc,
                delta=-moved,
                balance_after=0,
                reason="merge_out",
                idempotency_key=f"merge:{cc.id}:out:{target.id}",
                details=details,
            )
            _record(
                session,
                target,
                delta=moved,
                balance_after=target.stamps + moved,
                reason="merge_in",
                idempotency_key=f"merge:{cc.id}:in:{target.id}",
                details={**details, "from_customer_card_id": cc.id},
            )
            cc.stamps = 0
            target.stamps += moved
    taken = {name: getattr(loser, name) for name in _CONTACT_FIELDS if not getattr(winner, name)}
    # The loser gives up its contacts first: email and phone are unique per store.
    for name in _CONTACT_FIELDS:
        setattr(loser, name, None)
    if loser.state == "excluded" and winner.state == "active":
        winner.state = "excluded"  # an excluded person stays excluded
    loser.state = "merged"
    loser.merged_into_id = winner.id
    loser.search_text = ""
    session.flush()
    for name, value in taken.items():
        if value:
            setattr(winner, name, value)
    for name in _OTHER_FIELDS:
        if getattr(winner, name) is None and getattr(loser, name) is not None:
            if name.startswith("birth_") and winner.birth_month is not None:
                continue  # never mix the parts of two birthdays
            setattr(winner, name, getattr(loser, name))
    winner.search_text = build_search_text(
        winner.first_name, winner.last_name, winner.email, winner.phone
    )
    session.flush()
    session.expire(winner, ["external_references", "customer_cards"])
    session.expire(loser, ["external_references", "customer_cards"])
    log.info("customer.merged", store_id=store_id, winner_id=winner.id, loser_id=loser.id)
    return winner


def follow_merge(
    session: Session,
    *,
    store_id: int,
    source: str,
    loser_external_id: str,
    winner_external_id: str,
    now: dt.datetime | None = None,
) -> bool:
    """The source merged record `loser_external_id` into `winner_external_id`.

    Returns True when two customers became one (or the survivor's id was attached).
    """
    now = now or utcnow()
    if not winner_external_id or loser_external_id == winner_external_id:
        return False
    loser_ref = _reference(session, store_id=store_id, source=source, external_id=loser_external_id)
    winner_ref = _reference(
        session, store_id=store_id, source=source, external_id=winner_external_id
    )
    if loser_ref is None and winner_ref is None:
        return False  # neither is here yet: the survivor arrives on its own
    if loser_ref is None:
        assert winner_ref is not None
        # A tombstone: a late copy of the merged-away record must not come back as a person.
        session.add(
            ExternalReference(
                store_id=store_id,
                customer_id=winner_ref.customer_id,
                source=source,
                external_id=loser_external_id,
                metadata_={"merged_into": winner_external_id},
                deleted_at=now,
            )
        )
        session.flush()
        return False
    loser_ref.metadata_ = {**(loser_ref.metadata_ or {}), "merged_into": winner_external_id}
    if loser_ref.deleted_at is None:
        loser_ref.deleted_at = now
    if winner_ref is None:
        # The survivor's record has not arrived: its id joins the loser's customer now, and its
        # record (no content hash yet) will update that customer when it comes.
        session.add(
            ExternalReference(
                store_id=store_id,
                customer_id=loser_ref.customer_id,
                source=source,
                external_id=winner_external_id,
                metadata_={},
            )
        )
        session.flush()
        return True
    if winner_ref.customer_id == loser_ref.customer_id:
        session.flush()
        return False
    merge_customers(
        session,
        store_id=store_id,
        winner_id=winner_ref.customer_id,
        loser_id=loser_ref.customer_id,
        now=now,
    )
    return True


def _wipe(customer: Customer, now: dt.datetime) -> None:
    for name in (*_CONTACT_FIELDS, *_OTHER_FIELDS):
        setattr(customer, name, None)
    customer.metadata_ = {}
    customer.search_text = ""
    customer.state = "redacted"
    customer.updated_at = now


def erase_customer(
    session: Session, *, store_id: int, customer_id: int, now: dt.datetime | None = None
) -> Customer:
    """GDPR erasure of a person: PII gone, loyalty counts and tombstone references kept."""
    now = now or utcnow()
    customer = session.get(Customer, customer_id)
    if customer is None or customer.store_id != store_id:
        raise LookupError("no such customer in the store")
    customer = _survivor(session, customer)
    people = [customer]
    frontier = [customer.id]
    while frontier:  # customers merged into this one (transitively) are the same person
        merged = session.scalars(
            select(Customer).where(Customer.merged_into_id.in_(frontier))
        ).all()
        frontier = [c.id for c in merged if c not in people]
        people.extend(c for c in merged if c not in people)
    ids = [p.id for p in people]
    for person in people:
        _wipe(person, now)
    for ref in session.scalars(
        select(ExternalReference).where(ExternalReference.customer_id.in_(ids))
    ):
        ref.metadata_ = {}
        ref.content_hash = None
        if ref.deleted_at is None:
            ref.deleted_at = now
    session.flush()
    cards = session.scalar(
        select(CustomerCard.id).where(CustomerCard.customer_id.in_(ids)).limit(1)
    )
    log.info(
        "customer.erased", store_id=store_id, customer_id=customer.id, has_cards=cards is not None
    )
    return customer


def erase_reference(
    session: Session,
    *,
    store_id: int,
    source: str,
    external_id: str,
    now: dt.datetime | None = None,
) -> Customer:
    """Erase the person behind a source's id; an unknown id still leaves a tombstone."""
    now = now or utcnow()
    ref = _reference(session, store_id=store_id, source=source, external_id=external_id)
    if ref is not None:
        return erase_customer(session, store_id=store_id, customer_id=ref.customer_id, now=now)
    holder = Customer(store_id=store_id, state="redacted", metadata_={}, search_text="")
    session.add(holder)
    session.flush()
    session.add(
        ExternalReference(
            store_id=store_id,
            customer_id=holder.id,
            source=source,
            external_id=external_id,
            metadata_={},
            deleted_at=now,
        )
    )
    session.flush()
    log.info("customer.erased", store_id=store_id, customer_id=holder.id, tombstone_only=True)
    return holder
