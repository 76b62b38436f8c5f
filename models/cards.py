"""Card templates, rewards, customer cards (enrolment) and the stamp ledger."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from models import outbox
from models.errors import ErrorBag, NotFound, ValidationFailed
from models.tables import (
    CardTemplate,
    Customer,
    CustomerCard,
    OutboxMessage,
    Reward,
    StampLedgerEntry,
    Store,
    is_valid_id,
    utcnow,
)

MAX_STAMPS_PER_CALL = 1000
Scope = Literal["active", "archived", "all"]


# --- templates and rewards --------------------------------------------------------------------


def create_card(
    session: Session, *, store_id: int, name: str, stamps_required: int, initial_stamps: int = 0
) -> CardTemplate:
    if session.get(Store, store_id) is None:
        raise NotFound("Store")
    bag = ErrorBag()
    if not name.strip():
        bag.add("name", "can't be blank")
    if not 1 <= stamps_required <= 18:
        bag.add("stamps_required", "must be between 1 and 18")
    elif not 0 <= initial_stamps <= stamps_required - 1:
        bag.add("initial_stamps", f"must be between 0 and {stamps_required - 1}")
    bag.raise_if_any()
    card = CardTemplate(
        store_id=store_id,
        name=name.strip(),
        stamps_required=stamps_required,
        initial_stamps=initial_stamps,
    )
    session.add(card)
    session.flush()
    return card


def archive_card(session: Session, *, card_id: int) -> CardTemplate:
    card = session.get(CardTemplate, card_id)
    if card is None:
        raise NotFound("Card")
    if card.archived_at is None:
        card.archived_at = utcnow()
    return card


def list_cards(session: Session, *, store_id: int, scope: Scope = "active") -> list[CardTemplate]:
    query = select(CardTemplate).where(CardTemplate.store_id == store_id)
    if scope == "active":
        query = query.where(CardTemplate.archived_at.is_(None))
    elif scope == "archived":
        query = query.where(CardTemplate.archived_at.is_not(None))
    return list(session.scalars(query.order_by(CardTemplate.id)).all())


def rewards_by_card(session: Session, *, card_ids: list[int]) -> dict[int, list[Reward]]:
    """The rewards of several card templates in one query, keyed by card id."""
    by_card: dict[int, list[Reward]] = {card_id: [] for card_id in card_ids}
    for reward in session.scalars(
        select(Reward).where(Reward.card_id.in_(card_ids)).order_by(Reward.id)
    ):
        by_card[reward.card_id].append(reward)
    return by_card


def create_reward(
    session: Session, *, card_id: int, name: str, stamps: int, active: bool = True
) -> Reward:
    card = session.get(CardTemplate, card_id)
    if card is None:
        raise NotFound("Card")
    bag = ErrorBag()
    if not name.strip():
        bag.add("name", "can't be blank")
    if not 1 <= stamps <= card.stamps_required:
        bag.add(
            "stamps", f"must be between 1 and {card.stamps_required} (the card's stamps_required)"
        )
    bag.raise_if_any()
    reward = Reward(
        store_id=card.store_id, card_id=card.id, name=name.strip(), stamps=stamps, active=active
    )
    session.add(reward)
    session.flush()
    return reward


def redeemable_rewards(session: Session, customer_card: CustomerCard) -> list[Reward]:
    """Active rewards of the card that the current balance can pay for."""
    return list(
        session.scalars(
            select(Reward)
            .where(
                Reward.card_id == customer_card.card_id,
                Reward.active.is_(True),
                Reward.stamps <= customer_card.stamps,
            )
            .order_by(Reward.stamps, Reward.id)
        ).all()
    )


# --- customer cards -------------------------------------------------------------------------


def generate_code() -> str:
    """A 13-digit EAN-13-style code (12 random digits + check digit), scannable as a barcode."""
    body = "".join(str(secrets.randbelow(10)) for _ in range(12))
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def wallet_urls(pass_token: str, *, wallet_base_url: str) -> dict[str, str]:
    base = wallet_base_url.rstrip("/")
    return {
        "apple_wallet_url": f"{base}/passes/{pass_token}/apple",
        "google_wallet_url": f"{base}/passes/{pass_token}/google",
    }


def card_status(stamps: int, stamps_required: int) -> str:
    return "completed" if stamps >= stamps_required else "active"


def get_customer_card(
    session: Session, *, store_id: int, customer_id: int, customer_card_id: int
) -> CustomerCard:
    if not (is_valid_id(customer_id) and is_valid_id(customer_card_id)):
        raise NotFound("Customer card")
    cc = session.scalar(
        select(CustomerCard).where(
            CustomerCard.store_id == store_id,
            CustomerCard.customer_id == customer_id,
            CustomerCard.id == customer_card_id,
        )
    )
    if cc is None:
        raise NotFound("Customer card")
    return cc


def resolve_enrolment_card(session: Session, *, store_id: int, card_id: Any) -> CardTemplate:
    """The card template a create request enrols into (422 on `card_id` when unusable)."""
    if isinstance(card_id, bool) or not isinstance(card_id, int):
        raise ValidationFailed.single("card_id", "must be a number")
    if not is_valid_id(card_id):
        raise ValidationFailed.single("card_id", "does not match a card of this store")
    card = session.scalar(
        select(CardTemplate).where(CardTemplate.store_id == store_id, CardTemplate.id == card_id)
    )
    if card is None:
        raise ValidationFailed.single("card_id", "does not match a card of this store")
    if card.archived_at is not None:
        raise ValidationFailed.single("card_id", "is archived")
    return card


def enrol(session: Session, *, customer: Customer, card: CardTemplate) -> tuple[CustomerCard, bool]:
    """Give `customer` a card of template `card` (a no-op when they already hold one).

    A new card gets a unique barcode-style code and an unguessable pass token; the template's
    `initial_stamps` are applied as a `welcome_bonus` ledger entry.
    """
    existing = session.scalar(
        select(CustomerCard).where(
            CustomerCard.customer_id == customer.id, CustomerCard.card_id == card.id
        )
    )
    if existing is not None:
        return existing, False
    for _ in range(5):
        cc = CustomerCard(
            store_id=customer.store_id,
            customer_id=customer.id,
            card_id=card.id,
            stamps=0,
            code=generate_code(),
            pass_token=secrets.token_urlsafe(24),
            wallet_pass_installed=False,
        )
        try:
            # The unique (store, code) constraint decides; a collision just draws another code.
            with session.begin_nested():
                session.add(cc)
                session.flush()
            break
        except IntegrityError:
            existing = session.scalar(
                select(CustomerCard).where(
                    CustomerCard.customer_id == customer.id, CustomerCard.card_id == card.id
                )
            )
            if existing is not None:  # a concurrent request enrolled them first
                return existing, False
    else:  # pragma: no cover - 10^12 codes per store
        raise RuntimeError("could not allocate a unique card code")
    if card.initial_stamps > 0:
        _record(
            session,
            cc,
            delta=card.initial_stamps,
            balance_after=card.initial_stamps,
            reason="welcome_bonus",
            idempotency_key=f"welcome_bonus:{cc.id}",
        )
        cc.stamps = card.initial_stamps
    session.refresh(customer, ["customer_cards"])
    return cc, True


def queue_card_links(
    session: Session,
    *,
    customer: Customer,
    customer_cards: list[CustomerCard],
    wallet_base_url: str,
) -> int:
    """Record a `card_links` delivery per card (email/SMS come from the worker).

    Keyed by card and contact details: the same request sent twice sends once, but a customer
    whose email or phone changed gets the links again.
    """
    contact = hashlib.sha256(f"{customer.email}|{customer.phone}".encode()).hexdigest()[:16]
    for cc in customer_cards:
        outbox.enqueue(
            session,
            store_id=customer.store_id,
            kind="card_links",
            idempotency_key=f"card_links:{cc.id}:{contact}",
            payload={
                "customer_id": customer.id,
                "customer_card_id": cc.id,
                "card_id": cc.card_id,
                "channels": [
                    c for c, v in (("email", customer.email), ("sms", customer.phone)) if v
                ],
                **wallet_urls(cc.pass_token, wallet_base_url=wallet_base_url),
            },
        )
    return len(customer_cards)


# --- the ledger ---------------------------------------------------------------------------------


def _record(
    session: Session,
    cc: CustomerCard,
    *,
    delta: int,
    balance_after: int,
    reason: str,
    idempotency_key: str,
    reward_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> StampLedgerEntry:
    entry = StampLedgerEntry(
        store_id=cc.store_id,
        customer_card_id=cc.id,
        delta=delta,
        balance_after=balance_after,
        reason=reason,
        idempotency_key=idempotency_key,
        reward_id=reward_id,
        details=details or {},
    )
    session.add(entry)
    session.flush()
    return entry


def _notify(session: Session, cc: CustomerCard, entry: StampLedgerEntry) -> None:
    """Queue the pass update and push of a ledger entry created in this transaction.

    Their keys name that new entry, so no message can hold them yet: the rows are added without
    `outbox.enqueue`'s look-up per key (and are flushed together, in one INSERT, at commit).
    """
    payload = {
        "customer_card_id": cc.id,
        "ledger_entry_id": entry.id,
        "stamps": entry.balance_after,
    }
    for kind in ("pass_update", "push"):
        session.add(
            OutboxMessage(
                store_id=cc.store_id,
                kind=kind,
                idempotency_key=f"{kind}:ledger:{entry.id}",
                payload=dict(payload),
            )
        )


@dataclass(slots=True)
class LedgerResult:
    customer_card: CustomerCard
    entry: StampLedgerEntry
    applied: bool  # False when the idempotency key had already been used


def _existing_entry(session: Session, store_id: int, key: str) -> StampLedgerEntry | None:
    return session.scalar(
        select(StampLedgerEntry).where(
            StampLedgerEntry.store_id == store_id, StampLedgerEntry.idempotency_key == key
        )
    )


def _replay(session: Session, customer_card: CustomerCard, key: str) -> LedgerResult | None:
    """The earlier result of `key`, if it was used: the same key applies once.

    Concurrent calls with one key all pass the first look-up; the ledger's unique key then lets
    exactly one insert its row. The others roll back to their savepoint (undoing their balance
    change) and land here, returning the winner's entry instead of an IntegrityError.
    """
    if (entry := _existing_entry(session, customer_card.store_id, key)) is None:
        return None
    session.refresh(customer_card)
    return LedgerResult(customer_card, entry, applied=False)


def add_stamps(
    session: Session,
    *,
    customer_card: CustomerCard,
    stamps: int,
    reason: str = "stamp",
    idempotency_key: str | None = None,
    skip_notifications: bool = False,
    details: dict[str, Any] | None = None,
) -> LedgerResult:
    """Add stamps with one atomic `UPDATE … SET stamps = stamps + n` and its ledger row."""
    if (
        isinstance(stamps, bool)
        or not isinstance(stamps, int)
        or not 1 <= stamps <= MAX_STAMPS_PER_CALL
    ):
        raise ValidationFailed.single(
            "stamps", f"must be an integer between 1 and {MAX_STAMPS_PER_CALL}"
        )
    key = idempotency_key or f"api:{uuid.uuid4()}"
    # Without a caller's key the key is fresh: nothing can have used it, so there is nothing to
    # look up or replay and no savepoint to take (a stamp is then 4 statements, not 11).
    if idempotency_key and (replay := _replay(session, customer_card, key)) is not None:
        return replay
    now = utcnow()
    try:
        # A savepoint around the balance change and its ledger row (see `_replay`).
        with session.begin_nested() if idempotency_key else contextlib.nullcontext():
            new_balance = session.scalar(
                update(CustomerCard)
                .where(CustomerCard.id == customer_card.id)
                .values(stamps=CustomerCard.stamps + stamps, updated_at=now)
                .returning(CustomerCard.stamps)
            )
            assert new_balance is not None
            entry = _record(
                session,
                customer_card,
                delta=stamps,
                balance_after=new_balance,
                reason=reason,
                idempotency_key=key,
                details=details,
            )
    except IntegrityError:
        if not idempotency_key or (replay := _replay(session, customer_card, key)) is None:
            raise
        return replay
    # What the UPDATE wrote, without reading the row back.
    set_committed_value(customer_card, "stamps", new_balance)
    set_committed_value(customer_card, "updated_at", now)
    if not skip_notifications:
        _notify(session, customer_card, entry)
    return LedgerResult(customer_card, entry, applied=True)


def redeem(
    session: Session,
    *,
    customer_card: CustomerCard,
    reward_id: Any,
    idempotency_key: str | None = None,
    skip_notifications: bool = False,
) -> LedgerResult:
    """Deduct a reward's cost. The balance check and the deduction are one conditional UPDATE,
    so two concurrent redeems that together exceed the balance cannot both succeed."""
    if isinstance(reward_id, bool) or not isinstance(reward_id, int):
        raise ValidationFailed.single("reward_id", "must be a number")
    if not is_valid_id(reward_id):
        raise NotFound("Reward")
    reward = session.scalar(
        select(Reward).where(Reward.id == reward_id, Reward.card_id == customer_card.card_id)
    )
    if reward is None:
        raise NotFound("Reward")
    if not reward.active:
        raise ValidationFailed.single("reward_id", "is inactive")
    key = idempotency_key or f"api:{uuid.uuid4()}"
    if (replay := _replay(session, customer_card, key)) is not None:
        return replay
    try:
        # A savepoint around the balance change and its ledger row (see `_replay`).
        with session.begin_nested():
            new_balance = session.scalar(
                update(CustomerCard)
                .where(CustomerCard.id == customer_card.id, CustomerCard.stamps >= reward.stamps)
                .values(stamps=CustomerCard.stamps - reward.stamps, updated_at=utcnow())
                .returning(CustomerCard.stamps)
            )
            if new_balance is not None:
                entry = _record(
                    session,
                    customer_card,
                    delta=-reward.stamps,
                    balance_after=new_balance,
                    reason="redeem",
                    idempotency_key=key,
                    reward_id=reward.id,
                )
    except IntegrityError:
        if (replay := _replay(session, customer_card, key)) is None:
            raise
        return replay
    if new_balance is None:
        # A concurrent call with this key may have spent the stamps: that is a replay.
        if (replay := _replay(session, customer_card, key)) is not None:
            return replay
        session.refresh(customer_card)
        raise ValidationFailed.single(
            "base",
            f"not enough stamps: the card has {customer_card.stamps}, "
            f"the reward costs {reward.stamps}",
        )
    session.refresh(customer_card)
    if not skip_notifications:
        _notify(session, customer_card, entry)
    return LedgerResult(customer_card, entry, applied=True)


def ledger_sum(session: Session, *, customer_card_id: int) -> int:
    return int(
        session.scalar(
            select(func.coalesce(func.sum(StampLedgerEntry.delta), 0)).where(
                StampLedgerEntry.customer_card_id == customer_card_id
            )
        )
        or 0
    )
