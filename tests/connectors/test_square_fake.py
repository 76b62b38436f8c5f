"""The fake Square behaves like the API the connector is tested against."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import httpx
import pytest

from tests.fakes.square import DEFAULT_TOKEN, SEARCH_PATH, FakeSquare

AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}


def post(fake: FakeSquare, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.MockTransport(fake.handle)
    with httpx.Client(transport=transport, base_url="https://sq.test") as http:
        return http.post(SEARCH_PATH, json=body, headers=AUTH if headers is None else headers)


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["errors"][0]["code"]
    return code


@pytest.mark.parametrize(("limit", "code"), [(0, "VALUE_TOO_LOW"), (101, "VALUE_TOO_HIGH")])
def test_limit_outside_1_to_100(limit: int, code: str) -> None:
    response = post(FakeSquare(), {"limit": limit})
    assert response.status_code == 400
    assert error_code(response) == code
    assert response.json()["errors"][0]["category"] == "INVALID_REQUEST_ERROR"


def test_wrong_token_is_401_unauthorized() -> None:
    fake = FakeSquare()
    response = post(fake, {}, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert error_code(response) == "UNAUTHORIZED"
    assert post(fake, {}, headers={}).status_code == 401


def test_no_match_answers_an_empty_object() -> None:
    response = post(FakeSquare(), {"limit": 10})
    assert response.status_code == 200
    assert response.json() == {}


def test_updated_at_window_and_created_at_sort() -> None:
    fake = FakeSquare()
    ids = fake.generate(10, updated_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    window = {"start_at": "2025-01-01T00:00:03Z", "end_at": "2025-01-01T00:00:06+00:00"}
    query = {"filter": {"updated_at": window}, "sort": {"field": "CREATED_AT", "order": "DESC"}}
    response = post(fake, {"query": query})
    assert [c["id"] for c in response.json()["customers"]] == ids[3:6][::-1]


def test_unknown_cursor_and_changed_query_are_invalid_cursor() -> None:
    fake = FakeSquare()
    fake.generate(5)
    response = post(fake, {"limit": 2, "cursor": "made-up"})
    assert response.status_code == 400
    assert response.json()["errors"][0] == {
        "category": "INVALID_REQUEST_ERROR",
        "code": "INVALID_CURSOR",
        "detail": "The provided cursor is invalid or has expired.",
        "field": "cursor",
    }
    cursor = post(fake, {"limit": 2}).json()["cursor"]
    changed = {"limit": 2, "cursor": cursor, "query": {"sort": {"order": "DESC"}}}
    assert error_code(post(fake, changed)) == "INVALID_CURSOR"
    assert post(fake, {"limit": 2, "cursor": cursor}).status_code == 200
    assert fake.invalid_cursors == 2


def test_update_bumps_version_and_updated_at() -> None:
    fake = FakeSquare(now=lambda: dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    (cid,) = fake.generate(1, updated_at=dt.datetime(2024, 6, 1, tzinfo=dt.UTC))
    first = fake.update_customer(cid, given_name="A")
    second = fake.update_customer(cid, given_name="B")
    assert (first["version"], second["version"]) == (1, 2)
    # Never backwards, even when the clock is behind the stored time.
    assert "2024-06-01T00:00:00.000Z" < first["updated_at"] < second["updated_at"]


def test_injected_429_carries_retry_after() -> None:
    fake = FakeSquare()
    fake.throttle_next(1, retry_after=3)
    response = post(fake, {})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.json()["errors"][0]["category"] == "RATE_LIMIT_ERROR"
    assert error_code(response) == "RATE_LIMITED"
    assert post(fake, {}).status_code == 200


def test_generates_100k_customers_fast() -> None:
    fake = FakeSquare()
    started = time.perf_counter()
    ids = fake.generate(100_000)
    elapsed = time.perf_counter() - started
    assert len(set(ids)) == 100_000
    assert elapsed < 5.0, elapsed
    response = post(fake, {"limit": 100})
    assert len(response.json()["customers"]) == 100
