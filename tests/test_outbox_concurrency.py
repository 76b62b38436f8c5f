"""Concurrent delivery workers never send a card-link email or SMS twice.

Four threads, each with its own sessions (own pooled connections), run delivery passes over
the same 200 `card_links` rows at once against a real SMTP server (aiosmtpd) and a real HTTP
SMS provider on 127.0.0.1; the fakes' counts must show every message exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.cards import create_card, enrol, queue_card_links
from models.db import make_sessionmaker
from models.tables import Customer, OutboxMessage
from tests.fakes.sms import TOKEN as SMS_TOKEN
from tests.fakes.sms import FakeSms
from tests.fakes.smtp import FakeSmtp
from tests.outbox_helpers import WALLET, make_settings
from worker.outbox import deliver_due

ROWS = 200
WORKERS = 4


def _customers(engine: Engine, store_id: int, n: int) -> None:
    with make_sessionmaker(engine)() as s:
        card = create_card(s, store_id=store_id, name="Coffee Club", stamps_required=10)
        for i in range(n):
            customer = Customer(
                store_id=store_id,
                first_name=f"C{i}",
                email=f"c{i}@example.com",
                phone=f"+1415555{i:04d}",
                search_text="",
            )
            s.add(customer)
            s.flush()
            cc, _ = enrol(s, customer=customer, card=card)
            queue_card_links(s, customer=customer, customer_cards=[cc], wallet_base_url=WALLET)
        s.commit()


@pytest.mark.parametrize("batch", [5])
def test_concurrent_workers_send_each_message_once(
    engine: Engine, db_url: str, make_store: Callable[..., tuple[int, str]], batch: int
) -> None:
    store_id, _ = make_store()
    _customers(engine, store_id, ROWS)
    smtp, sms = FakeSmtp(), FakeSms()
    key = Fernet.generate_key()
    totals: list[dict[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with smtp.serve() as smtp_url, sms.serve() as sms_base:
        settings = make_settings(
            db_url,
            SMTP_URL=smtp_url,
            SMS_API_URL=f"{sms_base}/messages",
            SMS_API_TOKEN=SMS_TOKEN,
            SMS_FROM="+15550000000",
        )
        start = threading.Barrier(WORKERS)

        def worker() -> None:
            sessions = make_sessionmaker(engine)  # this thread's own sessions / connections
            mine = Counter[str]()
            try:
                start.wait()
                while True:
                    result = deliver_due(sessions, settings=settings, key=key, limit=batch)
                    mine.update(result)
                    if result["claimed"] == 0:
                        break
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
            with lock:
                totals.append(dict(mine))

        threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(WORKERS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        elapsed = time.perf_counter() - started
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)

    assert smtp.count == ROWS, smtp.count
    recipients = Counter(to for _, tos in smtp.envelopes for to in tos)
    assert len(recipients) == ROWS
    assert set(recipients.values()) == {1}
    assert len(set(smtp.message_ids())) == ROWS
    assert sms.count == ROWS
    assert len({m["To"] for m in sms.messages}) == ROWS

    assert sum(t.get("delivered", 0) for t in totals) == ROWS
    assert sum(t.get("claimed", 0) for t in totals) == ROWS
    assert sum(t.get("lost", 0) for t in totals) == 0
    assert sum(1 for t in totals if t.get("claimed", 0) > 0) >= 2  # the work was shared
    with Session(engine) as s:
        statuses = {
            str(status): int(n)
            for status, n in s.execute(
                select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)
            )
        }
    assert statuses == {"delivered": ROWS}
    print(f"\n{ROWS} rows, {WORKERS} workers, {db_url.split(':', maxsplit=1)[0]}: {elapsed:.2f} s")
