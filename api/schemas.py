"""Request bodies (shape only; the store's rules live in models/) and JSON renderings."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError
from sqlalchemy.orm import Session

from models.cards import card_status, redeemable_rewards, wallet_urls
from models.customers import CustomerFields
from models.normalize import Birthday, FieldError, check_metadata
from models.tables import CardTemplate, Customer, CustomerCard, ExternalReference, Reward


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _not_bool(value: Any) -> Any:
    # Lax pydantic reads `true` as 1: `"card_id": true` would enrol into card 1.
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _storable_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    # Checked here, not only in models/: a body nested too deeply cannot even be dumped
    # (the Idempotency-Key fingerprint), and NaN cannot be rendered back as JSON.
    if value is not None:
        try:
            check_metadata(value)
        except FieldError as exc:
            raise PydanticCustomError("metadata", str(exc)) from None
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_storable_metadata)]


class ReferenceIn(_In):
    source: str = Field(description="Lowercase slug of the foreign system, e.g. `shopify`")
    external_id: str | int = Field(description="The foreign system's id of this customer")
    metadata: Metadata = None


class CustomerIn(_In):
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    birthday: str | None = Field(default=None, description="YYYY-MM-DD, or --MM-DD without a year")
    metadata: Metadata = None
    external_references: list[ReferenceIn] | None = None

    def fields(self) -> CustomerFields:
        sent = self.model_fields_set
        out = CustomerFields()
        for name in ("first_name", "last_name", "email", "phone", "birthday", "metadata"):
            if name in sent:
                setattr(out, name, getattr(self, name))
        return out

    def references_raw(self) -> list[dict[str, Any]]:
        return [r.model_dump() for r in self.external_references or []]


class CreateCustomerIn(_In):
    customer: CustomerIn
    card_id: Int | None = None
    send_card_links: bool = False


class UpdateCustomerIn(_In):
    customer: CustomerIn


class StampIn(_In):
    # The range is enforced by models.cards.add_stamps (one message for every caller); here it
    # is only documented, so that the OpenAPI spec tells clients what is accepted.
    stamps: Int = Field(
        description="Number of stamps to add", json_schema_extra={"minimum": 1, "maximum": 1000}
    )
    skip_notifications: bool = False


class RedeemIn(_In):
    reward_id: Int
    skip_notifications: bool = False


# --- renderings -------------------------------------------------------------------------------


def _ts(value: dt.datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def birthday_of(customer: Customer) -> str | None:
    if customer.birth_month is None or customer.birth_day is None:
        return None
    return Birthday(customer.birth_month, customer.birth_day, customer.birth_year).isoformat()


def render_reference(ref: ExternalReference) -> dict[str, Any]:
    return {
        "source": ref.source,
        "external_id": ref.external_id,
        "metadata": ref.metadata_ or {},
        "created_at": _ts(ref.created_at),
        "updated_at": _ts(ref.updated_at),
    }


def render_reward(reward: Reward) -> dict[str, Any]:
    return {"id": reward.id, "name": reward.name, "stamps": reward.stamps, "active": reward.active}


def render_customer_card(
    cc: CustomerCard, *, wallet_base_url: str, session: Session | None = None
) -> dict[str, Any]:
    card: CardTemplate = cc.card
    out: dict[str, Any] = {
        "id": cc.id,
        "card_id": cc.card_id,
        "card_name": card.name,
        "stamps": cc.stamps,
        "stamps_required": card.stamps_required,
        "status": card_status(cc.stamps, card.stamps_required),
        "code": cc.code,
        "wallet_pass_installed": cc.wallet_pass_installed,
        **wallet_urls(cc.pass_token, wallet_base_url=wallet_base_url),
        "created_at": _ts(cc.created_at),
        "updated_at": _ts(cc.updated_at),
    }
    if session is not None:
        out["rewards"] = [render_reward(r) for r in redeemable_rewards(session, cc)]
    return out


def render_customer(customer: Customer, *, wallet_base_url: str) -> dict[str, Any]:
    return {
        "id": customer.id,
        "first_name": customer.first_name,
        "last_name": customer.last_name,
        "email": customer.email,
        "phone": customer.phone,
        "birthday": birthday_of(customer),
        "metadata": customer.metadata_ or {},
        "state": customer.state,
        "external_references": [render_reference(r) for r in customer.external_references],
        "customer_cards": [
            render_customer_card(cc, wallet_base_url=wallet_base_url)
            for cc in customer.customer_cards
        ],
        "created_at": _ts(customer.created_at),
        "updated_at": _ts(customer.updated_at),
    }


def render_card(card: CardTemplate, rewards: list[Reward]) -> dict[str, Any]:
    return {
        "id": card.id,
        "name": card.name,
        "stamps_required": card.stamps_required,
        "initial_stamps": card.initial_stamps,
        "archived": card.archived_at is not None,
        "archived_at": _ts(card.archived_at),
        "rewards": [render_reward(r) for r in rewards],
        "created_at": _ts(card.created_at),
        "updated_at": _ts(card.updated_at),
    }


# --- response models (documentation of the JSON above, used for the OpenAPI spec) --------------


class ReferenceOut(BaseModel):
    source: str
    external_id: str
    metadata: dict[str, Any]
    created_at: str | None
    updated_at: str | None


class RewardOut(BaseModel):
    id: int
    name: str
    stamps: int
    active: bool


class CustomerCardOut(BaseModel):
    id: int
    card_id: int
    card_name: str
    stamps: int
    stamps_required: int
    status: str = Field(description="`active` below stamps_required, `completed` at or above")
    code: str = Field(description="Barcode value (EAN-13 style), unique per store")
    wallet_pass_installed: bool
    apple_wallet_url: str
    google_wallet_url: str
    created_at: str | None
    updated_at: str | None


class CustomerCardDetailOut(CustomerCardOut):
    rewards: list[RewardOut] = Field(description="Active rewards the balance can pay for now")


class CustomerOut(BaseModel):
    id: int
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None = Field(description="E.164")
    birthday: str | None = Field(description="YYYY-MM-DD, or --MM-DD when the year is unknown")
    metadata: dict[str, Any]
    state: str
    external_references: list[ReferenceOut]
    customer_cards: list[CustomerCardOut]
    created_at: str | None
    updated_at: str | None


class CardOut(BaseModel):
    id: int
    name: str
    stamps_required: int
    initial_stamps: int
    archived: bool
    archived_at: str | None
    rewards: list[RewardOut]
    created_at: str | None
    updated_at: str | None


class ErrorOut(BaseModel):
    error: str


class ValidationErrorOut(BaseModel):
    errors: dict[str, list[str]]
