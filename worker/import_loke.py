"""The LOKE source of a sync run: customers, their list memberships and points (an edge module).

`make_adapter(context)` is registered in `worker.sync.ADAPTERS["loke"]`. Per page, inside the
page's transaction (see `worker.sync.SourceAdapter`):

- `pages` — the organization's customers, 1000 a page, `X-Next-Page` cursors saved with each
  page; every run is a full pass (the seed does not say which way `sort=updated` sorts; see
  `connectors.loke.paginate`), unchanged customers cost reads only;
- `prepare_page` — fetches the memberships (`GET .../customers/{id}/memberships`, paged by 10)
  of the page's customers that are new or changed (`models.ingest.changed_records`), and of
  nobody else: a re-run of an unchanged organization fetches no memberships at all;
- `after_page` — writes each fetched list of list names into the customer's `loke` reference
  metadata (`memberships`), then, when the connection has a points rule, brings card balances
  to the points.

Why memberships are NOT record attributes: attributes are part of the content hash that decides
"changed" on the next run, and the next run's records come from the customer list, which has no
memberships — every customer would look changed on every run and every membership list would
be fetched again. Written into the metadata beside the hash instead, they are re-read exactly
when the customer changes in LOKE. (A membership change that LOKE does not reflect in the
customer record itself is therefore picked up with the customer's next change.) They are
written in the page's transaction: a crash loses them together with the page, and the resumed
run, seeing the page's customers still changed, fetches them again.

Points → stamps (optional): `config["points_per_stamp"]` (a positive integer) with
`config["card_id"]` (the store's card). Each live local customer's card balance is made equal to
`floor(points / points_per_stamp)`, where `points` is the sum of the `pointsBalance` of every
LOKE record linked to that customer (one person may have several LOKE records sharing an
email), by one `models.balances.set_balance` adjustment keyed
`loke:points:<smallest LOKE id>:<n>` (written for the whole page at once by its bulk form
`models.balances.import_balances`) — a re-run finds the balance right and writes nothing, a
points change writes the next adjustment, so nothing is ever counted twice. Every page
re-checks every customer on it (a few queries per page, whatever its size), so the card follows
LOKE's points while both systems run side by side. Imports never notify and never give welcome
stamps. Without the rule the points stay in the reference metadata (`points_balance`,
`statistics`) only.

Memberships are never fetched or written for a customer erased locally (`redacted`). They are
fetched `membership_concurrency` (config, default 4) requests at a time. Other optional
connection settings: `token_auth_method` (`client_secret_basic`, the default, or
`client_secret_post`; see `connectors.loke.client`) and `sort_updated_newest_first` (true only
once LOKE documents `sort=updated` as newest first: incremental runs then stop at the first
page older than the window; see `connectors.loke.paginate`).

A dry run fetches no memberships and writes nothing beyond what the sync run rolls back.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Final

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from connectors.errors import ConfigurationError
from connectors.loke.client import LokeClient
from connectors.loke.mapping import MEMBERSHIPS_KEY, POINTS_KEY, SOURCE, map_customer
from connectors.loke.paginate import fetch_memberships, iter_customer_pages
from connectors.ratelimit import make_budget
from connectors.records import ForeignCustomer, Page
from models.balances import BalanceImport, import_balances
from models.ingest import IngestPolicy, PageCounts, changed_records
from models.sync_state import policy_from_config
from models.tables import CardTemplate, Customer, CustomerCard, ExternalReference, utcnow
from worker.sync import AdapterContext

log = structlog.get_logger(__name__)

# LOKE publishes no rate limit. A first import fans out one memberships request per customer,
# so the cold-start budget is a little larger than Square's 10/s; the client honours the
# server's 429 + Retry-After whenever it says otherwise.
LOKE_BUDGET: Final = (25.0, 25.0)
DEFAULT_AUTH_URL: Final = "https://auth.loke.global"
# Customer states whose cards an import may write.
_WRITABLE_STATES: Final = frozenset({"active", "excluded"})
_CHUNK: Final = 500  # ids per `IN (…)` look-up
# Memberships requests in flight at once (one per changed customer): a first import is
# latency-bound without it (1000 customers at ~200 ms each per page); the rate budget still caps the
# request rate. `config["membership_concurrency"]` overrides it (1: one at a time).
MEMBERSHIP_CONCURRENCY: Final = 4
MAX_MEMBERSHIP_CONCURRENCY: Final = 32

clock: Callable[[], float] = time.monotonic
"""The monotonic clock access tokens expire by (the test seam, like `AdapterContext.sleep`)."""


def _positive_int(config: Mapping[str, Any], name: str) -> int | None:
    raw = config.get(name)
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigurationError(f"loke connection: {name} must be a positive integer")
    return raw


def points_rule(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """`(points_per_stamp, card_id)` from the connection's config; None when no rule is set.
    ConfigurationError for an unusable value, or a rule without a card."""
    per_stamp = _positive_int(config, "points_per_stamp")
    card_id = _positive_int(config, "card_id")
    if per_stamp is None:
        return None
    if card_id is None:
        raise ConfigurationError("loke connection: points_per_stamp needs a card_id")
    return per_stamp, card_id


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class LokeAdapter:
    """LOKE customers + memberships + points for one connection (see the module doc)."""

    def __init__(self, context: AdapterContext) -> None:
        target, settings = context.target, context.settings
        self.store_id = target.store_id
        self.policy: IngestPolicy = policy_from_config(target.config, source=SOURCE)
        self.rule = points_rule(target.config)
        self.newest_first = target.config.get("sort_updated_newest_first") is True
        concurrency = _positive_int(target.config, "membership_concurrency")
        self.concurrency = min(concurrency or MEMBERSHIP_CONCURRENCY, MAX_MEMBERSHIP_CONCURRENCY)
        capacity, rate = LOKE_BUDGET
        self.client = LokeClient(
            http=context.http,
            organization_id=target.account,
            client_id=context.secrets.get("client_id", ""),
            client_secret=context.secrets.get("client_secret", ""),
            auth_url=str(target.config.get("auth_url") or DEFAULT_AUTH_URL),
            token_auth_method=str(target.config.get("token_auth_method") or "client_secret_basic"),
            budget=context.budget
            or make_budget(redis_url=settings.redis_url, capacity=capacity, refill_per_second=rate),
            budget_key=f"loke:{target.account}",
            sleep=context.sleep,
            clock=clock,
        )
        self._card_checked = False
        self._memberships: dict[str, list[str] | None] = {}
        self.memberships_fetched = 0

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
            self.client,
            updated_since=updated_since,
            overlap=overlap,
            cursor=cursor,
            newest_first=self.newest_first,
        )

    # -- memberships -----------------------------------------------------------------------

    def prepare_page(self, session: Session, *, page: Page, dry_run: bool) -> Page:
        """Fetch the memberships of the page's new or changed customers (nobody else's)."""
        self._memberships = {}
        if dry_run:
            return page
        if self.rule is not None:
            self._check_card(session)
        live = [r for r in page.records if not r.deleted]
        changed = changed_records(session, store_id=self.store_id, records=live, policy=self.policy)
        wanted = {r.external_id for r in changed}
        # An erased person's record stays "changed" (the ingest suppresses it): never ask
        # LOKE about them again, never write anything about them.
        wanted -= self._erased(session, wanted)
        for external_id, names in self._fetch_memberships(sorted(wanted)):
            if names is None:
                log.warning("loke.memberships.customer_gone", store_id=self.store_id)
            self._memberships[external_id] = names
        self.memberships_fetched += len(self._memberships)
        return page

    def _fetch_memberships(self, external_ids: list[str]) -> Iterator[tuple[str, list[str] | None]]:
        """(external id, list names or None when LOKE no longer has the customer) for each id,
        `self.concurrency` requests in flight at once. The first error stops the rest (queued
        fetches are cancelled, those in flight finish) and is raised."""
        if self.concurrency <= 1 or len(external_ids) <= 1:
            for external_id in external_ids:
                yield external_id, fetch_memberships(self.client, external_id)
            return
        workers = min(self.concurrency, len(external_ids))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loke-memberships") as pool:
            futures = {pool.submit(fetch_memberships, self.client, e): e for e in external_ids}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _erased(self, session: Session, external_ids: set[str]) -> set[str]:
        """The ids among `external_ids` whose `loke` reference belongs to an erased customer."""
        erased: set[str] = set()
        for chunk in _chunks(sorted(external_ids)):
            erased.update(
                session.scalars(
                    select(ExternalReference.external_id)
                    .join(Customer, Customer.id == ExternalReference.customer_id)
                    .where(
                        ExternalReference.store_id == self.store_id,
                        ExternalReference.source == SOURCE,
                        ExternalReference.external_id.in_(chunk),
                        Customer.state == "redacted",
                    )
                )
            )
        return erased

    def _write_memberships(self, session: Session) -> int:
        """Put the fetched membership lists into the `loke` references' metadata (references
        that exist: a record left out as a conflict gets its list once it is written)."""
        fetched = {k: v for k, v in self._memberships.items() if v is not None}
        if not fetched:
            return 0
        written = 0
        now = utcnow()
        for chunk in _chunks(sorted(fetched)):
            rows = session.execute(
                select(
                    ExternalReference.id, ExternalReference.external_id, ExternalReference.metadata_
                )
                .join(Customer, Customer.id == ExternalReference.customer_id)
                .where(
                    ExternalReference.store_id == self.store_id,
                    ExternalReference.source == SOURCE,
                    ExternalReference.external_id.in_(chunk),
                    ExternalReference.deleted_at.is_(None),
                    Customer.state != "redacted",
                )
            ).all()
            for ref_id, external_id, metadata in rows:
                names = fetched[external_id]
                current = dict(metadata or {})
                if current.get(MEMBERSHIPS_KEY) == names:
                    continue
                current[MEMBERSHIPS_KEY] = names
                # The page holds the store's ingest lock (apply_customer_page took it): no
                # other ingest writes these references' metadata until the page commits.
                session.execute(
                    update(ExternalReference)
                    .where(ExternalReference.id == ref_id)
                    .values(metadata_=current, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                written += 1
        return written

    # -- points → stamps ---------------------------------------------------------------------

    def _check_card(self, session: Session) -> int:
        """The rule's card, checked once per run: the store's and not archived."""
        assert self.rule is not None
        card_id = self.rule[1]
        if not self._card_checked:
            card = session.get(CardTemplate, card_id)
            if card is None or card.store_id != self.store_id:
                raise ConfigurationError(
                    f"loke connection: card {card_id} is not a card of this store"
                )
            if card.archived_at is not None:
                raise ConfigurationError(f"loke connection: card {card_id} is archived")
            self._card_checked = True
        return card_id

    def _points_by_customer(
        self, session: Session, records: Iterable[ForeignCustomer]
    ) -> dict[int, tuple[int, str]]:
        """live customer id → (sum of the points of ALL its LOKE records, smallest LOKE id),
        for the customers the page's records are linked to and that may earn."""
        ids = sorted({r.external_id for r in records if not r.deleted})
        customers: set[int] = set()
        for chunk in _chunks(ids):
            customers.update(
                session.scalars(
                    select(ExternalReference.customer_id).where(
                        ExternalReference.store_id == self.store_id,
                        ExternalReference.source == SOURCE,
                        ExternalReference.external_id.in_(chunk),
                        ExternalReference.deleted_at.is_(None),
                    )
                )
            )
        totals: dict[int, tuple[int, str]] = {}
        for chunk in _chunks(sorted(customers)):
            rows = session.execute(
                select(
                    ExternalReference.customer_id,
                    ExternalReference.external_id,
                    ExternalReference.metadata_,
                )
                .join(Customer, Customer.id == ExternalReference.customer_id)
                .where(
                    ExternalReference.store_id == self.store_id,
                    ExternalReference.source == SOURCE,
                    ExternalReference.customer_id.in_(chunk),
                    ExternalReference.deleted_at.is_(None),
                    Customer.state.in_(_WRITABLE_STATES),
                )
            ).all()
            for customer_id, external_id, metadata in rows:
                points = (metadata or {}).get(POINTS_KEY)
                if isinstance(points, bool) or not isinstance(points, int):
                    continue
                total, first = totals.get(customer_id, (0, external_id))
                totals[customer_id] = (total + points, min(first, external_id))
        return totals

    def _balances(self, session: Session, card_id: int, customer_ids: list[int]) -> dict[int, int]:
        balances: dict[int, int] = {}
        for chunk in _chunks(customer_ids):
            rows = session.execute(
                select(CustomerCard.customer_id, CustomerCard.stamps).where(
                    CustomerCard.card_id == card_id, CustomerCard.customer_id.in_(chunk)
                )
            ).all()
            balances.update({int(c): int(s) for c, s in rows})
        return balances

    def _apply_points(self, session: Session, page: Page) -> int:
        """Bring each page customer's card balance to floor(points / points_per_stamp)."""
        assert self.rule is not None
        per_stamp, _ = self.rule
        card_id = self._check_card(session)
        totals = self._points_by_customer(session, page.records)
        balances = self._balances(session, card_id, sorted(totals))
        imports = []
        for customer_id, (points, first_id) in sorted(totals.items()):
            target = points // per_stamp if points > 0 else 0
            if balances.get(customer_id, 0) == target:
                continue
            imports.append(
                BalanceImport(
                    customer_id=customer_id,
                    target=target,
                    key_prefix=f"loke:points:{first_id}",
                    details={"source": SOURCE, "points": points, "points_per_stamp": per_stamp},
                )
            )
        # `import_balances` is `set_balance` for a whole page at once (same keys, same rules).
        results = import_balances(session, store_id=self.store_id, card_id=card_id, imports=imports)
        return sum(1 for result in results.values() if result.delta)

    def after_page(
        self, session: Session, *, page: Page, counts: PageCounts, dry_run: bool
    ) -> None:
        """Write the fetched memberships, then the points rule's balances (page transaction)."""
        if dry_run:
            self._memberships = {}
            return
        memberships = self._write_memberships(session)
        self._memberships = {}
        adjusted = self._apply_points(session, page) if self.rule is not None else 0
        if memberships or adjusted:
            log.info(
                "loke.page.follow_up",
                store_id=self.store_id,
                memberships=memberships,
                balance_adjustments=adjusted,
            )

    def fetch_customer(self, external_id: str) -> ForeignCustomer | None:
        """The source's current record of one customer; None when LOKE has none (404)."""
        obj = self.client.get_customer(external_id)
        return map_customer(obj) if obj is not None else None


def make_adapter(context: AdapterContext) -> LokeAdapter:
    """The `ADAPTERS["loke"]` factory."""
    return LokeAdapter(context)
