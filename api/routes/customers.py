"""Customers: list/search, exact reference look-up, show, create (upsert by reference), update."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from api import idempotency
from api.deps import SessionDep, StoreDep, WalletDep
from api.pagination import MAX_ITEMS, set_headers
from api.schemas import (
    CreateCustomerIn,
    CustomerOut,
    ErrorOut,
    UpdateCustomerIn,
    ValidationErrorOut,
    render_customer,
)
from models import cards as card_ops
from models import customers as customer_ops

router = APIRouter(prefix="/api/v1/accounts/{account_id}", tags=["customers"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Invalid or missing API token"},
    404: {"model": ErrorOut, "description": "Store or customer not found"},
    422: {"model": ValidationErrorOut, "description": "Validation failed"},
}
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retry-safe key: the same key within 24 h returns the first response",
    ),
]


@router.get("/customers", response_model=list[CustomerOut], responses=ERRORS)
def list_customers(
    request: Request,
    store_id: StoreDep,
    session: SessionDep,
    wallet: WalletDep,
    search: Annotated[str | None, Query(max_length=200)] = None,
    source: Annotated[str | None, Query(max_length=32)] = None,
    external_id: Annotated[str | None, Query(max_length=255)] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    items: Annotated[int, Query(ge=1, description=f"Per page; at most {MAX_ITEMS}")] = 20,
) -> JSONResponse:
    result = customer_ops.list_customers(
        session,
        store_id=store_id,
        search=search,
        source=source,
        external_id=external_id,
        page=page,
        per_page=min(items, MAX_ITEMS),
    )
    response = JSONResponse([render_customer(c, wallet_base_url=wallet) for c in result.items])
    set_headers(response, request.url, result)
    return response


@router.get("/customers/{customer_id}", response_model=CustomerOut, responses=ERRORS)
def show_customer(
    store_id: StoreDep, customer_id: int, session: SessionDep, wallet: WalletDep
) -> JSONResponse:
    customer = customer_ops.get_customer(session, store_id=store_id, customer_id=customer_id)
    return JSONResponse(render_customer(customer, wallet_base_url=wallet))


def _replayed(replay: idempotency.Replay) -> Response:
    return Response(
        replay.body,
        status_code=replay.status_code,
        media_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


def _with_key(
    session: Session,
    *,
    store_id: int,
    key: str | None,
    request: Request,
    body: Any,
) -> Response | None:
    if key is None:
        return None
    replay = idempotency.claim(
        session,
        store_id=store_id,
        key=key,
        request_fingerprint=idempotency.fingerprint(request.method, request.url.path, body),
    )
    return _replayed(replay) if replay else None


def finish(
    session: Session, *, store_id: int, key: str | None, status_code: int, body: Any
) -> JSONResponse:
    """Remember the response for the key (same transaction), commit, answer."""
    response = JSONResponse(body, status_code=status_code)
    if key is not None:
        idempotency.remember(
            session,
            store_id=store_id,
            key=key,
            status_code=status_code,
            body=bytes(response.body).decode(),
        )
    session.commit()
    return response


@router.post(
    "/customers",
    status_code=201,
    response_model=CustomerOut,
    responses={**ERRORS, 200: {"model": CustomerOut, "description": "Upserted by reference"}},
)
def create_customer(
    request: Request,
    store_id: StoreDep,
    payload: CreateCustomerIn,
    session: SessionDep,
    wallet: WalletDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Create a customer; with references that already exist, update their customer (200)."""
    if replay := _with_key(
        session,
        store_id=store_id,
        key=idempotency_key,
        request=request,
        body=payload.model_dump(mode="json", exclude_unset=True),
    ):
        return replay
    references = customer_ops.parse_references(payload.customer.references_raw())
    card = (
        card_ops.resolve_enrolment_card(session, store_id=store_id, card_id=payload.card_id)
        if payload.card_id is not None
        else None
    )
    result = customer_ops.create_customer(
        session, store_id=store_id, fields=payload.customer.fields(), references=references
    )
    customer = result.customer
    if card is not None:
        enrolled, _ = card_ops.enrol(session, customer=customer, card=card)
        to_send = [enrolled]
    else:
        to_send = list(customer.customer_cards)
    if payload.send_card_links:
        card_ops.queue_card_links(
            session, customer=customer, customer_cards=to_send, wallet_base_url=wallet
        )
    session.flush()
    return finish(
        session,
        store_id=store_id,
        key=idempotency_key,
        status_code=201 if result.created else 200,
        body=render_customer(customer, wallet_base_url=wallet),
    )


def _update(
    store_id: int, customer_id: int, payload: UpdateCustomerIn, session: Session, wallet: str
) -> JSONResponse:
    customer = customer_ops.get_customer(session, store_id=store_id, customer_id=customer_id)
    references = customer_ops.parse_references(payload.customer.references_raw())
    customer_ops.update_customer(
        session,
        store_id=store_id,
        customer=customer,
        fields=payload.customer.fields(),
        references=references,
    )
    session.flush()
    session.refresh(customer)
    return finish(
        session,
        store_id=store_id,
        key=None,
        status_code=200,
        body=render_customer(customer, wallet_base_url=wallet),
    )


@router.patch("/customers/{customer_id}", response_model=CustomerOut, responses=ERRORS)
def patch_customer(
    store_id: StoreDep,
    customer_id: int,
    payload: UpdateCustomerIn,
    session: SessionDep,
    wallet: WalletDep,
) -> JSONResponse:
    """Update sent fields; metadata is shallow-merged, references upserted."""
    return _update(store_id, customer_id, payload, session, wallet)


@router.put("/customers/{customer_id}", response_model=CustomerOut, responses=ERRORS)
def put_customer(
    store_id: StoreDep,
    customer_id: int,
    payload: UpdateCustomerIn,
    session: SessionDep,
    wallet: WalletDep,
) -> JSONResponse:
    """Same as PATCH (Rails-style update: absent fields are left as they are)."""
    return _update(store_id, customer_id, payload, session, wallet)
