"""Pagy-style pagination headers: Current-Page, Page-Items, Total-Pages, Total-Count, Link."""

from __future__ import annotations

from fastapi import Response
from starlette.datastructures import URL

from models.customers import Page

MAX_ITEMS = 100


def set_headers(response: Response, url: URL, page: Page) -> None:
    response.headers["Current-Page"] = str(page.page)
    response.headers["Page-Items"] = str(page.per_page)
    response.headers["Total-Pages"] = str(page.total_pages)
    response.headers["Total-Count"] = str(page.total_count)

    def link(number: int, rel: str) -> str:
        return f'<{url.include_query_params(page=number, items=page.per_page)}>; rel="{rel}"'

    links = [link(1, "first")]
    if page.page > 1:
        links.append(link(min(page.page - 1, page.total_pages), "prev"))
    if page.page < page.total_pages:
        links.append(link(page.page + 1, "next"))
    links.append(link(page.total_pages, "last"))
    response.headers["Link"] = ", ".join(links)
