"""Customer cards: index, show (with redeemable rewards), stamp, redeem."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from api.deps import SessionDep, StoreDep, WalletDep
from api.routes.customers import ERRORS, IdempotencyKey, _with_key, finish
from api.schemas import (
    CardOut,
    CustomerCardDetailOut,
    CustomerCardOut,
    RedeemIn,
    StampIn,
    render_card,
    render_customer_card,
)
from models import cards as card_ops
from models import customers as customer_ops

router = APIRouter(prefix="/api/v1/accounts/{account_id}", tags=["customer cards"])
CARD_ERRORS = {
    **ERRORS,
    404: {**ERRORS[404], "description": "Store, customer, customer card or reward not found"},
}


@router.get(
    "/customers/{customer_id}/customer_cards",
    response_model=list[CustomerCardOut],
    responses=ERRORS,
)
def list_customer_cards(
    store_id: StoreDep, customer_id: int, session: SessionDep, wallet: WalletDep
) -> Response:
    customer = customer_ops.get_customer(session, store_id=store_id, customer_id=customer_id)
    return JSONResponse(
        [render_customer_card(cc, wallet_base_url=wallet) for cc in customer.customer_cards]
    )


@router.get(
    "/customers/{customer_id}/customer_cards/{card_id}",
    response_model=CustomerCardDetailOut,
    responses=CARD_ERRORS,
)
def show_customer_card(
    store_id: StoreDep, customer_id: int, card_id: int, session: SessionDep, wallet: WalletDep
) -> Response:
    cc = card_ops.get_customer_card(
        session, store_id=store_id, customer_id=customer_id, customer_card_id=card_id
    )
    return JSONResponse(render_customer_card(cc, wallet_base_url=wallet, session=session))


@router.post(
    "/customers/{customer_id}/customer_cards/{card_id}/stamp",
    response_model=CustomerCardDetailOut,
    responses=CARD_ERRORS,
)
def stamp(
    request: Request,
    store_id: StoreDep,
    customer_id: int,
    card_id: int,
    payload: StampIn,
    session: SessionDep,
    wallet: WalletDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Add stamps (a ledger entry; pass update + push queued unless `skip_notifications`)."""
    if replay := _with_key(
        session,
        store_id=store_id,
        key=idempotency_key,
        request=request,
        body=payload.model_dump(mode="json"),
    ):
        return replay
    cc = card_ops.get_customer_card(
        session, store_id=store_id, customer_id=customer_id, customer_card_id=card_id
    )
    # The ledger key is not derived from the header: the key row claimed above (same
    # transaction) already makes a retry a replay, and after 24 h the key must apply again
    # rather than silently match the old ledger row.
    card_ops.add_stamps(
        session,
        customer_card=cc,
        stamps=payload.stamps,
        skip_notifications=payload.skip_notifications,
    )
    return finish(
        session,
        store_id=store_id,
        key=idempotency_key,
        status_code=200,
        body=render_customer_card(cc, wallet_base_url=wallet, session=session),
    )


@router.post(
    "/customers/{customer_id}/customer_cards/{card_id}/redeem",
    response_model=CustomerCardDetailOut,
    responses=CARD_ERRORS,
)
def redeem(
    request: Request,
    store_id: StoreDep,
    customer_id: int,
    card_id: int,
    payload: RedeemIn,
    session: SessionDep,
    wallet: WalletDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Redeem a reward: deducts its cost; 422 when the balance is short or the reward inactive."""
    if replay := _with_key(
        session,
        store_id=store_id,
        key=idempotency_key,
        request=request,
        body=payload.model_dump(mode="json"),
    ):
        return replay
    cc = card_ops.get_customer_card(
        session, store_id=store_id, customer_id=customer_id, customer_card_id=card_id
    )
    card_ops.redeem(
        session,
        customer_card=cc,
        reward_id=payload.reward_id,
        skip_notifications=payload.skip_notifications,  # ledger key: see `stamp`
    )
    return finish(
        session,
        store_id=store_id,
        key=idempotency_key,
        status_code=200,
        body=render_customer_card(cc, wallet_base_url=wallet, session=session),
    )


@router.get("/cards", response_model=list[CardOut], responses=ERRORS, tags=["cards"])
def list_cards(
    store_id: StoreDep,
    session: SessionDep,
    scope: Annotated[
        card_ops.Scope, Query(description="active (default), archived or all")
    ] = "active",
) -> Response:
    cards = card_ops.list_cards(session, store_id=store_id, scope=scope)
    rewards = card_ops.rewards_by_card(session, card_ids=[c.id for c in cards])
    return JSONResponse([render_card(c, rewards[c.id]) for c in cards])
