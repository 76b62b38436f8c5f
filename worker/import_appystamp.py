"""The Appy Stamp source of a sync run: customers, then their stamp balances (an edge module).

`make_adapter(context)` is registered in `worker.sync.ADAPTERS["appystamp"]`. Per page, inside
the page's transaction (see `worker.sync.SourceAdapter`):

- `pages` — a full pass over `GET /customers` (the API has no updated-since filter; unchanged
  records cost nothing thanks to content hashes), resumable by the saved `after` cursor;
- `prepare_page` — when the connection has a card (`config.card_id`), fetches the activities
  (`GET /customers/{id}/activities`) of the page's customers that changed
  (`models.ingest.changed_records`) or whose local card balance differs from `stampBalance`;
- `after_page` — writes them to the ledger (keys `appystamp:activity:<id>`), then makes the
  card's balance equal `stampBalance` with one `set_balance`-style adjustment (keys
  `appystamp:balance:<customer id>:<n>`) whenever the activities do not add up to it — or are
  not available at all (`PLAN_UPGRADE_REQUIRED`, or no activities endpoint: the rest of the run
  uses adjustments only). The whole page is one `models.balances.import_balances` batch
  (`import_ledger` + `set_balance` per customer, in a constant number of statements). Every
  sync re-checks every customer of every page (one query per page), so the local balance
  follows the source's.

Customers excluded from the program (`state` removed) keep a mirror of their balance too: the
import copies what the source holds, it does not earn. Without a card the balances are kept in
the reference metadata only (`stamp_balance`): there is no card to hold stamps and none is
invented. Merged-away records (`mergedIntoCustomerId`) carry no balance of their own here (the
source moved it to the survivor). Imports never notify and never give welcome stamps. A dry run
fetches and writes nothing beyond the customer pages.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.appystamp.client import AppyStampClient
from connectors.appystamp.mapping import SOURCE, Activity, map_customer, stamp_balance
from connectors.appystamp.paginate import fetch_activities, iter_customer_pages
from connectors.errors import ConfigurationError, FatalError
from connectors.ratelimit import make_budget
from connectors.records import ForeignCustomer, Page
from models.balances import BalanceImport, import_balances
from models.ingest import IngestPolicy, PageCounts, changed_records
from models.sync_state import policy_from_config
from models.tables import CardTemplate, Customer, CustomerCard, ExternalReference
from worker.sync import AdapterContext

log = structlog.get_logger(__name__)

# The seed publishes no rate limit: 10 requests/s per account keeps N workers polite, and the
# client honours the server's Retry-After / X-RateLimit-Reset when it says otherwise.
APPYSTAMP_BUDGET: Final = (10.0, 10.0)
PLAN_UPGRADE_REQUIRED: Final = "PLAN_UPGRADE_REQUIRED"
# Customer states whose cards an import may write.
_WRITABLE_STATES: Final = frozenset({"active", "excluded"})
_MAX_MERGE_HOPS: Final = 10


def card_id_from_config(config: Mapping[str, Any]) -> int | None:
    """The connection's `card_id` (None: not configured); ConfigurationError when unusable."""
    raw = config.get("card_id")
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigurationError("appystamp connection: card_id must be a card id")
    return raw


class AppyStampAdapter:
    """Appy Stamp customers + balances for one connection (see the module doc)."""

    def __init__(self, context: AdapterContext) -> None:
        target, settings = context.target, context.settings
        self.store_id = target.store_id
        self.policy: IngestPolicy = policy_from_config(target.config, source=SOURCE)
        self.card_id = card_id_from_config(target.config)
        capacity, rate = APPYSTAMP_BUDGET
        self.client = AppyStampClient(
            http=context.http,
            api_key=context.secrets.get("api_key", ""),
            api_secret=context.secrets.get("api_secret", ""),
            budget=context.budget
            or make_budget(redis_url=settings.redis_url, capacity=capacity, refill_per_second=rate),
            # One Appy Stamp account per store, and every connection's `account` is the same
            # placeholder ("appystamp") unless given: the store keeps shops' budgets apart.
            budget_key=f"appystamp:{target.account}:{target.store_id}",
            sleep=context.sleep,
        )
        self.activities_available = True
        self._card_checked = False
        self._activities: dict[str, list[Activity]] = {}

    @property
    def requests(self) -> int:
        return self.client.requests

    @property
    def throttled(self) -> int:
        return self.client.throttled

    def pages(
        self, *, updated_since: dt.datetime | None, overlap: dt.timedelta, cursor: str | None
    ) -> Iterator[Page]:
        return iter_customer_pages(
            self.client, updated_since=updated_since, overlap=overlap, cursor=cursor
        )

    # -- balances ------------------------------------------------------------------------

    def _check_card(self, session: Session) -> int:
        """The configured card, checked once per run: the store's and not archived."""
        assert self.card_id is not None
        if not self._card_checked:
            card = session.get(CardTemplate, self.card_id)
            if card is None or card.store_id != self.store_id:
                raise ConfigurationError(
                    f"appystamp connection: card {self.card_id} is not a card of this store"
                )
            if card.archived_at is not None:
                raise ConfigurationError(f"appystamp connection: card {self.card_id} is archived")
            self._card_checked = True
        return self.card_id

    def _live_customers(
        self, session: Session, external_ids: Iterable[str]
    ) -> dict[str, tuple[int, str]]:
        """external id → (live customer id, state) through the `appystamp` references, merges
        followed (one query, plus one per merge hop)."""
        ids = sorted(set(external_ids))
        if not ids:
            return {}
        rows = session.execute(
            select(
                ExternalReference.external_id,
                Customer.id,
                Customer.state,
                Customer.merged_into_id,
            )
            .join(Customer, Customer.id == ExternalReference.customer_id)
            .where(
                ExternalReference.store_id == self.store_id,
                ExternalReference.source == SOURCE,
                ExternalReference.external_id.in_(ids),
                ExternalReference.deleted_at.is_(None),
            )
        ).all()
        found = {r.external_id: (r.id, r.state, r.merged_into_id) for r in rows}
        for _ in range(_MAX_MERGE_HOPS):
            pending = {m for _, state, m in found.values() if state == "merged" and m}
            if not pending:
                break
            survivors = {
                r.id: (r.id, r.state, r.merged_into_id)
                for r in session.execute(
                    select(Customer.id, Customer.state, Customer.merged_into_id).where(
                        Customer.store_id == self.store_id, Customer.id.in_(pending)
                    )
                ).all()
            }
            for ext, (cid, state, merged_into) in list(found.items()):
                if state == "merged" and merged_into:
                    found[ext] = survivors.get(merged_into, (cid, "gone", None))
        return {ext: (cid, state) for ext, (cid, state, _) in found.items()}

    def _balances(self, session: Session, customer_ids: Iterable[int]) -> dict[int, int]:
        """customer id → stamps on the configured card (customers without one are absent)."""
        ids = sorted(set(customer_ids))
        if not ids:
            return {}
        rows = session.execute(
            select(CustomerCard.customer_id, CustomerCard.stamps).where(
                CustomerCard.card_id == self.card_id, CustomerCard.customer_id.in_(ids)
            )
        ).all()
        return {int(customer_id): int(stamps) for customer_id, stamps in rows}

    @staticmethod
    def _balance_records(page: Page) -> list[ForeignCustomer]:
        return [
            r
            for r in page.records
            if not r.deleted and not r.merged_into and stamp_balance(r) is not None
        ]

    def _groups(
        self, session: Session, records: Sequence[ForeignCustomer]
    ) -> dict[int, list[ForeignCustomer]]:
        """The page's balance records per live local customer whose card may be written."""
        live = self._live_customers(session, (r.external_id for r in records))
        groups: dict[int, list[ForeignCustomer]] = {}
        for record in records:
            customer = live.get(record.external_id)
            if customer is None or customer[1] not in _WRITABLE_STATES:
                continue  # not written (conflict, suppressed) or not a person any more
            groups.setdefault(customer[0], []).append(record)
        return groups

    @staticmethod
    def _target(records: Sequence[ForeignCustomer]) -> int:
        return sum(stamp_balance(r) or 0 for r in records)

    def prepare_page(self, session: Session, *, page: Page, dry_run: bool) -> Page:
        """Fetch the activities of the page's changed or out-of-balance customers."""
        self._activities = {}
        if self.card_id is None or dry_run:
            return page
        self._check_card(session)
        if not self.activities_available:
            return page
        records = self._balance_records(page)
        wanted = {
            r.external_id
            for r in changed_records(
                session, store_id=self.store_id, records=records, policy=self.policy
            )
        }
        groups = self._groups(session, records)
        balances = self._balances(session, groups)
        for customer_id, group in groups.items():
            if balances.get(customer_id, 0) != self._target(group):
                wanted.update(r.external_id for r in group)
        for external_id in sorted(wanted):
            try:
                self._activities[external_id] = fetch_activities(self.client, external_id)
            except ConfigurationError as exc:
                if exc.code != PLAN_UPGRADE_REQUIRED:
                    raise
                self._unavailable(exc)
                break
            except FatalError as exc:
                if exc.code == "CUSTOMER_NOT_FOUND":
                    log.warning("appystamp.activities.customer_gone", store_id=self.store_id)
                    continue
                if exc.status in (404, 405, 501):
                    self._unavailable(exc)
                    break
                raise
        return page

    def _unavailable(self, exc: Exception) -> None:
        self.activities_available = False
        self._activities = {}
        log.warning(
            "appystamp.activities.unavailable",
            store_id=self.store_id,
            error=f"{type(exc).__name__}: {exc}",
            fallback="set_balance",
        )

    def after_page(
        self, session: Session, *, page: Page, counts: PageCounts, dry_run: bool
    ) -> None:
        """Bring each customer's card balance to `stampBalance` (ledger first, then adjust)."""
        if self.card_id is None or dry_run:
            return
        card_id = self._check_card(session)
        groups = self._groups(session, self._balance_records(page))
        balances = self._balances(session, groups)
        imports = []
        for customer_id, group in groups.items():
            target = self._target(group)
            entries = [
                (f"appystamp:activity:{a.id}", a.stamp_change, a.details())
                for r in group
                for a in self._activities.get(r.external_id, ())
            ]
            if not entries and balances.get(customer_id, 0) == target:
                continue  # in step: nothing to read or write
            imports.append(
                BalanceImport(
                    customer_id=customer_id,
                    entries=entries,
                    target=target,
                    key_prefix=f"appystamp:balance:{min(r.external_id for r in group)}",
                    details={
                        "source": SOURCE,
                        "stamp_balance": target,
                        "activities": self.activities_available,
                    },
                )
            )
        self._activities = {}
        # One batch per page: a constant number of statements, whatever the page's size.
        import_balances(session, store_id=self.store_id, card_id=card_id, imports=imports)

    def fetch_customer(self, external_id: str) -> ForeignCustomer | None:
        """The source's current record of one customer; None when it has none (404)."""
        obj = self.client.get_customer(external_id)
        return map_customer(obj) if obj is not None else None


def make_adapter(context: AdapterContext) -> AppyStampAdapter:
    """The `ADAPTERS["appystamp"]` factory."""
    return AppyStampAdapter(context)
