"""The Square storm: signed Square deliveries through the real API into real worker processes.

400 customers, each created then updated a few times (increasing `version`); 30% of the 2,000
requests are redeliveries of the same `event_id`; everything shuffled (so updates overtake their
creates) and sent from a thread pool to `loyalty-sync api`, drained by `loyalty-sync worker`.
Then two customers with stamp histories are merged by Square (a `customer.created` with
`creation_source: MERGE` and two `customer.deleted`, all naming the merge in
`event_context.merge`), delivered out of order through the API as well.

The store must equal the source's final state (newest version of every customer, nothing lost or
doubled) and the merge must leave one live customer holding both stamp histories.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.cards import add_stamps, create_card, enrol
from models.connections import connect
from models.crypto import derive_key
from models.db import make_sessionmaker
from models.tables import Customer, CustomerCard, ExternalReference, StampLedgerEntry
from tests.test_cli import _free_port
from tests.test_webhook_storm import (  # noqa: F401 - broker is a fixture
    ENV_VARIABLES,
    Processes,
    _count,
    broker,
    wait_healthy,
)

MERCHANT = "MLSTORMSQUARE"
SIGNATURE_KEY = "square-storm-signature-key"
NOTIFICATION_URL = "https://hooks.example.com/webhooks/square"
CUSTOMERS = 400
UNIQUE = 1400
TOTAL = 2000
T0 = dt.datetime(2026, 4, 1, 8, 0, tzinfo=dt.UTC)


def _customer(cid: str, version: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "given_name": f"G{cid}v{version}",
        "family_name": "Storm",
        "email_address": extra.pop("email", f"{cid.lower()}.v{version}@square.example.com"),
        "creation_source": extra.pop("creation_source", "DIRECTORY"),
        "updated_at": (T0 + dt.timedelta(minutes=version)).isoformat().replace("+00:00", "Z"),
        "version": version,
        **extra,
    }


def _event(
    type_: str, event_id: str, customer: dict[str, Any], merge: dict[str, Any] | None = None
) -> bytes:
    obj: dict[str, Any] = {"customer": customer}
    if merge is not None:
        obj["event_context"] = {"merge": merge}
    data: dict[str, Any] = {"type": "customer", "id": customer["id"], "object": obj}
    if type_ == "customer.deleted":
        data["deleted"] = True
    return json.dumps(
        {
            "merchant_id": MERCHANT,
            "type": type_,
            "event_id": event_id,
            "created_at": customer["updated_at"],
            "data": data,
        }
    ).encode()


def history(seed: int = 9) -> tuple[list[bytes], dict[str, dict[str, Any]]]:
    rng = random.Random(seed)
    versions = [1] * CUSTOMERS
    for _ in range(UNIQUE - CUSTOMERS):
        versions[rng.randrange(CUSTOMERS)] += 1
    originals: list[bytes] = []
    final: dict[str, dict[str, Any]] = {}
    for c in range(CUSTOMERS):
        cid = f"SQSTORM{c:04d}"
        for v in range(versions[c]):
            type_ = "customer.created" if v == 0 else "customer.updated"
            originals.append(_event(type_, f"ev-{cid}-{v}", _customer(cid, v)))
        last = versions[c] - 1
        final[cid] = {
            "first_name": f"G{cid}v{last}",
            "email": f"{cid.lower()}.v{last}@square.example.com",
        }
    requests = originals + [rng.choice(originals) for _ in range(TOTAL - UNIQUE)]
    rng.shuffle(requests)
    return requests, final


def signed(body: bytes) -> dict[str, str]:
    mac = hmac.new(SIGNATURE_KEY.encode(), NOTIFICATION_URL.encode() + body, hashlib.sha256)
    return {
        "x-square-hmacsha256-signature": base64.b64encode(mac.digest()).decode(),
        "content-type": "application/json",
    }


def _wait_drained(engine: Engine, processes: Processes, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while _count(engine, "pending", "processing"):
        processes.check_alive()
        assert time.monotonic() < deadline, f"not drained:\n{processes.logs()}"
        time.sleep(0.2)


def test_square_storm_and_merge_through_the_real_api_and_workers(
    db_url: str,
    engine: Engine,
    broker: str | None,  # noqa: F811 - the fixture
    make_store: Callable[..., tuple[int, str]],
    tmp_path: Path,
) -> None:
    store_id, _ = make_store()
    with make_sessionmaker(engine)() as s:
        connect(
            s,
            store_id=store_id,
            source="square",
            account=MERCHANT,
            access_token="sq-token",
            api_base_url=None,
            api_version=None,
            key=derive_key("storm"),
        )
        s.commit()
    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.update(
        DATABASE_URL=db_url,
        SQUARE_WEBHOOK_URL=NOTIFICATION_URL,
        SQUARE_WEBHOOK_SIGNATURE_KEY=SIGNATURE_KEY,
        LOG_LEVEL="WARNING",
        DB_POOL_SIZE="4",
        PYTHONWARNINGS="ignore",
    )
    if broker is not None:
        env["CELERY_BROKER_URL"] = broker
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    requests, final = history()
    processes = Processes(workdir, env)
    try:
        processes.start("worker", "worker", "--concurrency", "2")
        processes.start("api", "api", "--port", str(port))
        wait_healthy(base, processes)

        with httpx.Client(base_url=base, timeout=30) as client:

            def send(body: bytes) -> tuple[str, int, str]:
                response = client.post("/webhooks/square", content=body, headers=signed(body))
                status = response.json().get("status", "") if response.status_code == 200 else ""
                return json.loads(body)["event_id"], response.status_code, status

            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(send, requests))
            assert Counter(code for _, code, _ in answers) == {200: TOTAL}
            statuses: dict[str, list[str]] = {}
            for event_id, _, status in answers:
                statuses.setdefault(event_id, []).append(status)
            assert len(statuses) == UNIQUE
            for event_id, seen in statuses.items():
                assert sorted(seen) == ["accepted"] + ["duplicate"] * (len(seen) - 1), event_id
            _wait_drained(engine, processes)

            with Session(engine) as s:
                refs = s.execute(
                    select(ExternalReference.external_id, Customer.first_name, Customer.email)
                    .join(Customer, Customer.id == ExternalReference.customer_id)
                    .where(ExternalReference.store_id == store_id)
                ).all()
                assert len(refs) == CUSTOMERS
                for external_id, first_name, email in refs:
                    assert {"first_name": first_name, "email": email} == final[external_id]
                # Two of them have stamp histories when Square merges them.
                card = create_card(s, store_id=store_id, name="Storm card", stamps_required=12)
                histories = {"SQSTORM0001": 3, "SQSTORM0002": 5}
                for cid, stamps in histories.items():
                    customer = s.scalars(
                        select(Customer)
                        .join(ExternalReference, ExternalReference.customer_id == Customer.id)
                        .where(ExternalReference.external_id == cid)
                    ).one()
                    cc, _ = enrol(s, customer=customer, card=card)
                    add_stamps(s, customer_card=cc, stamps=stamps, skip_notifications=True)
                s.commit()

            merge = {"from_customer_ids": list(histories), "to_customer_id": "SQMERGED"}
            kept_email = final["SQSTORM0001"]["email"]
            merged = [
                _event(
                    "customer.created",
                    "ev-merge-created",
                    _customer("SQMERGED", 50, email=kept_email, creation_source="MERGE"),
                    merge,
                ),
                *(
                    _event(
                        "customer.deleted",
                        f"ev-merge-deleted-{cid}",
                        _customer(cid, 50, email=final[cid]["email"]),
                        merge,
                    )
                    for cid in histories
                ),
            ]
            random.Random(3).shuffle(merged)
            for body in merged + merged[:1]:  # a redelivery too
                response = client.post("/webhooks/square", content=body, headers=signed(body))
                assert response.status_code == 200, response.text
            _wait_drained(engine, processes)
    finally:
        processes.stop()

    assert _count(engine, "done") == UNIQUE + 3
    with Session(engine) as s:
        live = s.scalars(
            select(Customer).where(Customer.store_id == store_id, Customer.state == "active")
        ).all()
        # 400 customers, two of them merged into the new profile: 399 live, 1 merged away.
        assert len(live) == CUSTOMERS - 1
        survivor = s.scalars(
            select(Customer)
            .join(ExternalReference, ExternalReference.customer_id == Customer.id)
            .where(ExternalReference.external_id == "SQMERGED")
        ).one()
        assert survivor.state == "active"
        assert survivor.email == kept_email
        merged_away = s.scalars(select(Customer).where(Customer.state == "merged")).all()
        assert [c.merged_into_id for c in merged_away] == [survivor.id]
        cards = s.scalars(select(CustomerCard).where(CustomerCard.customer_id == survivor.id)).all()
        assert [cc.stamps for cc in cards] == [8]
        ledger_sum = s.scalar(
            select(func.sum(StampLedgerEntry.delta)).where(
                StampLedgerEntry.customer_card_id == cards[0].id
            )
        )
        assert ledger_sum == 8
