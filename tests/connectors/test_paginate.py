"""connectors.paginate.CursorPaginator: cursors followed, loops caught, bounded, restartable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from connectors.errors import FatalError, InvalidCursorError, SkippableRecord
from connectors.paginate import CursorPaginator, map_records
from connectors.records import ForeignCustomer


def fake_source(items: list[int], page_size: int) -> dict[str | None, tuple[list[int], str | None]]:
    """cursor → (items of that page, next cursor) of a well-behaved API."""
    pages: dict[str | None, tuple[list[int], str | None]] = {}
    cursor: str | None = None
    for offset in range(0, len(items), page_size):
        following = f"c{offset + page_size}" if offset + page_size < len(items) else None
        pages[cursor] = (items[offset : offset + page_size], following)
        cursor = following
    return pages


def drain(
    paginator: CursorPaginator, pages: dict[str | None, tuple[list[int], str | None]]
) -> list[int]:
    seen: list[int] = []
    while not paginator.done:
        items, following = pages[paginator.cursor]
        seen.extend(items)
        paginator.update_state(following)
    return seen


def test_first_page_has_no_cursor_and_cursors_are_followed() -> None:
    paginator = CursorPaginator()
    assert (paginator.cursor, paginator.done, paginator.pages) == (None, False, 0)
    paginator.update_state("a")
    assert (paginator.cursor, paginator.done) == ("a", False)
    paginator.update_state("b")
    assert (paginator.cursor, paginator.done) == ("b", False)
    paginator.update_state(None)
    assert (paginator.cursor, paginator.done, paginator.pages) == (None, True, 3)


def test_walks_every_page_exactly_once() -> None:
    pages = fake_source(list(range(23)), page_size=5)
    assert drain(CursorPaginator(), pages) == list(range(23))


def test_resumes_from_a_start_cursor() -> None:
    pages = fake_source(list(range(23)), page_size=5)
    paginator = CursorPaginator("c10")
    assert paginator.cursor == "c10"
    assert drain(paginator, pages) == list(range(10, 23))
    assert paginator.pages == 3


def test_empty_string_cursor_means_last_page() -> None:
    paginator = CursorPaginator("")
    assert paginator.cursor is None
    paginator.update_state("")
    assert paginator.done
    assert paginator.cursor is None


def test_single_page() -> None:
    paginator = CursorPaginator()
    paginator.update_state(None)
    assert paginator.done


@pytest.mark.parametrize(
    "answers",
    [
        ["a", "a"],  # the same cursor twice in a row
        ["a", "b", "c", "a"],  # a cycle back to an earlier page
        ["a", "b", "b"],
    ],
)
def test_loop_detection(answers: list[str]) -> None:
    paginator = CursorPaginator()
    for cursor in answers[:-1]:
        paginator.update_state(cursor)
    with pytest.raises(FatalError, match="pagination loop") as caught:
        paginator.update_state(answers[-1])
    assert not isinstance(caught.value, InvalidCursorError)  # not something to restart on


def test_start_cursor_counts_as_seen() -> None:
    paginator = CursorPaginator("saved")
    with pytest.raises(FatalError, match="pagination loop"):
        paginator.update_state("saved")


def test_max_pages_allows_exactly_that_many() -> None:
    paginator = CursorPaginator(max_pages=3)
    paginator.update_state("a")
    paginator.update_state("b")
    paginator.update_state(None)
    assert paginator.done


def test_max_pages_exceeded() -> None:
    paginator = CursorPaginator(max_pages=3)
    paginator.update_state("a")
    paginator.update_state("b")
    with pytest.raises(FatalError, match="max_pages=3"):
        paginator.update_state("c")


def test_max_pages_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pages"):
        CursorPaginator(max_pages=0)


def test_restart_goes_back_to_the_first_page_and_forgets_seen_cursors() -> None:
    paginator = CursorPaginator("expired", max_pages=3)
    paginator.update_state("a")
    paginator.update_state("b")
    paginator.restart()
    assert (paginator.cursor, paginator.done, paginator.pages) == (None, False, 0)
    # the same cursors again are no loop after a restart, and max_pages counts afresh
    paginator.update_state("a")
    paginator.update_state("b")
    paginator.update_state(None)
    assert paginator.done


def test_restart_after_done() -> None:
    pages = fake_source(list(range(7)), page_size=3)
    paginator = CursorPaginator()
    assert drain(paginator, pages) == list(range(7))
    paginator.restart()
    assert not paginator.done
    assert drain(paginator, pages) == list(range(7))


def test_update_after_done_is_a_bug() -> None:
    paginator = CursorPaginator()
    paginator.update_state(None)
    with pytest.raises(RuntimeError):
        paginator.update_state("a")


def test_fresh_paginators_share_nothing() -> None:
    first = CursorPaginator()
    first.update_state("a")
    second = CursorPaginator()
    second.update_state("a")  # no loop: state is per run
    assert (first.cursor, second.cursor) == ("a", "a")


def test_map_records_counts_what_it_leaves_out() -> None:
    def map_one(item: Mapping[str, Any]) -> ForeignCustomer:
        if not item.get("id"):
            raise SkippableRecord("no id")
        return ForeignCustomer(source="test", external_id=str(item["id"]))

    records, skipped = map_records(
        [{"id": 1}, {"id": ""}, "not an object", {"id": 2}], map_one, source="test"
    )
    assert [r.external_id for r in records] == ["1", "2"]
    assert skipped == 2
