"""Pure normalisation/validation functions of models/normalize.py (no database)."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import phonenumbers
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from models.normalize import (
    EXTERNAL_ID_MAX,
    METADATA_MAX_BYTES,
    Birthday,
    FieldError,
    _validated_email,
    build_search_text,
    check_external_id,
    check_metadata,
    check_source,
    merge_metadata,
    normalise_email,
    normalise_phone,
    parse_birthday,
    phone_digits,
)

SLUG = re.compile(r"[a-z][a-z0-9_]{0,31}")

# --- phone ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("+1 (212) 555-4240", "US"),
        ("(212) 555-4240", "US"),
        ("+12125554240", "US"),
        ("212.555.4240", "US"),
        ("1-212-555-4240", "US"),
        ("  +1 212 555 4240  ", "US"),
        ("tel:+1-212-555-4240", "US"),
        # An international number means the same whatever the store's region.
        ("+1 (212) 555-4240", "GB"),
        ("+12125554240", "FR"),
        ("(212) 555-4240", "us"),
    ],
)
def test_phone_formats_normalise_to_e164(raw: str, region: str) -> None:
    assert normalise_phone(raw, region) == "+12125554240"


def test_phone_national_number_is_read_in_the_store_region() -> None:
    assert normalise_phone("020 7946 0958", "GB") == "+442079460958"
    assert normalise_phone("01 42 68 53 00", "FR") == "+33142685300"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "abc",
        "123",
        "+1 212 555",  # too short
        "+1 (012) 555-4240",  # US area codes never start with 0
        "+999 1234567",  # no such country code
        "+1 212 555 4240 " + "9" * 40,  # absurdly long
        "555-4240",  # no area code: not a complete US number
    ],
)
def test_invalid_phones_raise_field_error(raw: str) -> None:
    with pytest.raises(FieldError):
        normalise_phone(raw, "US")


_US_AREA = st.sampled_from(["212", "646", "415", "312", "617", "305", "206", "702", "917"])


@st.composite
def us_number(draw: st.DrawFn) -> tuple[str, str, str]:
    area = draw(_US_AREA)
    exchange = draw(st.from_regex(r"[2-9][0-9]{2}", fullmatch=True))
    line = draw(st.from_regex(r"[0-9]{4}", fullmatch=True))
    assume(exchange[1:] != "11")  # N11 codes are service numbers, not exchanges
    parsed = phonenumbers.parse(f"+1{area}{exchange}{line}")
    assume(phonenumbers.is_valid_number(parsed))
    return area, exchange, line


_US_TEMPLATES = [
    "+1 ({a}) {e}-{l}",
    "({a}) {e}-{l}",
    "{a}-{e}-{l}",
    "{a}.{e}.{l}",
    "{a} {e} {l}",
    "{a}{e}{l}",
    "1{a}{e}{l}",
    "1 ({a}) {e} {l}",
    "+1{a}{e}{l}",
    "+1-{a}-{e}-{l}",
    "+1.{a}.{e}.{l}",
    "tel:+1-{a}-{e}-{l}",
]


@settings(max_examples=200)
@given(us_number(), st.sampled_from(_US_TEMPLATES), st.sampled_from(["", " ", "\t"]))
def test_every_formatting_of_a_us_number_normalises_to_one_e164(
    number: tuple[str, str, str], template: str, pad: str
) -> None:
    area, exchange, line = number
    expected = f"+1{area}{exchange}{line}"
    raw = pad + template.format(a=area, e=exchange, l=line) + pad
    result = normalise_phone(raw, "US")
    assert result == expected
    # Idempotent, and an E.164 number means the same in any region.
    assert normalise_phone(result, "US") == result
    assert normalise_phone(result, "DE") == result


_REGIONS = sorted(
    r for r in ("US", "GB", "FR", "DE", "ES", "MX", "BR", "AU", "JP", "IN", "CO", "CL", "NL")
)
_FORMATS = [
    phonenumbers.PhoneNumberFormat.E164,
    phonenumbers.PhoneNumberFormat.INTERNATIONAL,
    phonenumbers.PhoneNumberFormat.NATIONAL,
    phonenumbers.PhoneNumberFormat.RFC3966,
]


@settings(max_examples=150)
@given(
    st.sampled_from(_REGIONS),
    st.sampled_from(["example_number", "example_number_for_type_mobile"]),
    st.sampled_from(_FORMATS),
)
def test_normalise_phone_is_idempotent_over_regions_and_formats(
    region: str, kind: str, fmt: int
) -> None:
    if kind == "example_number":
        number = phonenumbers.example_number(region)
    else:
        number = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    assert number is not None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    formatted = phonenumbers.format_number(number, fmt)
    once = normalise_phone(formatted, region)
    assert once == e164
    assert normalise_phone(once, region) == once
    assert re.fullmatch(r"\+[1-9]\d{6,14}", once)


@settings(max_examples=200)
@given(st.text(max_size=30))
def test_normalise_phone_either_returns_e164_or_raises_field_error(raw: str) -> None:
    try:
        result = normalise_phone(raw, "US")
    except FieldError:
        return
    assert re.fullmatch(r"\+[1-9]\d{6,14}", result)
    assert normalise_phone(result, "US") == result


# --- email ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("jane@example.com", "jane@example.com"),
        ("A@x.com", "a@x.com"),
        ("Jane.Doe@Example.COM", "jane.doe@example.com"),
        ("  jane+tag@example.org ", "jane+tag@example.org"),
        ("JANE_DOE-1@sub.example.io", "jane_doe-1@sub.example.io"),
    ],
)
def test_email_is_normalised_lower_case(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "jane",
        "jane@",
        "@example.com",
        "jane@@example.com",
        "jane doe@example.com",
        "jane..doe@example.com",
        ".jane@example.com",
        "jane@example",
        "jane@exa mple.com",
        "jane@-example.com",
        "j@" + "a" * 320 + ".com",
    ],
)
def test_invalid_emails_raise_field_error(raw: str) -> None:
    with pytest.raises(FieldError, match=r"invalid|too long"):
        normalise_email(raw)


_LOCAL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._+-]{0,20}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda s: ".." not in s
)
_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
_TLD = st.sampled_from(["com", "org", "io", "net", "COM", "Co", "shop"])


@st.composite
def emails(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABEL, min_size=1, max_size=3))
    return f"{draw(_LOCAL)}@{'.'.join(labels)}.{draw(_TLD)}"


@settings(max_examples=200)
@given(emails(), st.sampled_from(["", " ", "\t"]))
def test_email_normalisation_is_idempotent_and_case_insensitive(address: str, pad: str) -> None:
    once = normalise_email(pad + address + pad)
    assert once == address.lower()
    assert normalise_email(once) == once
    # Any casing of the same address normalises to the same stored value.
    assert normalise_email(address.upper()) == once
    assert normalise_email(address.swapcase()) == once


@settings(max_examples=200)
@given(st.text(max_size=40))
def test_normalise_email_either_returns_a_lower_case_address_or_raises(raw: str) -> None:
    try:
        result = normalise_email(raw)
    except FieldError:
        return
    assert "@" in result
    assert result == result.lower()
    assert normalise_email(result) == result


def _slow_email(raw: str) -> str | None:
    try:
        return _validated_email(raw.strip())
    except FieldError:
        return None


def _fast_email(raw: str) -> str | None:
    try:
        return normalise_email(raw)
    except FieldError:
        return None


_ATEXT = st.sampled_from(list("abcXYZ019!#$%&'*+/=?^_`{|}~-.\"@ é"))
_DOMAINS = st.sampled_from(
    [
        "example.com",
        "EXAMPLE.co.uk",
        "gmail.com",
        "localhost",
        "x.local",
        "ex-ample.org",
        "-bad.com",
        "a..b.com",
        "münchen.de",
        "example.com.",
        "123.45",
        "x.test",
        "a" * 70 + ".com",
    ]
)


@settings(max_examples=400)
@given(
    st.one_of(
        st.builds(
            lambda loc, dom: f"{''.join(loc)}@{dom}", st.lists(_ATEXT, max_size=70), _DOMAINS
        ),
        st.text(max_size=40),
    )
)
def test_the_email_fast_path_agrees_with_email_validator(raw: str) -> None:
    assert _fast_email(raw) == _slow_email(raw)


# --- birthday ---------------------------------------------------------------------------------

TODAY = dt.date(2026, 6, 15)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1990-04-23", Birthday(month=4, day=23, year=1990)),
        ("2000-02-29", Birthday(month=2, day=29, year=2000)),
        ("--04-23", Birthday(month=4, day=23, year=None)),
        ("--02-29", Birthday(month=2, day=29, year=None)),
        ("--12-31", Birthday(month=12, day=31, year=None)),
        ("0000-04-23", Birthday(month=4, day=23, year=None)),  # Square's year-less form
        ("0000-02-29", Birthday(month=2, day=29, year=None)),
        (" 1990-04-23 ", Birthday(month=4, day=23, year=1990)),
        ("1900-01-01", Birthday(month=1, day=1, year=1900)),
        ("2026-06-15", Birthday(month=6, day=15, year=2026)),  # today
        ("2026-06-16", Birthday(month=6, day=16, year=2026)),  # a customer ahead of UTC
    ],
)
def test_valid_birthdays(raw: str, expected: Birthday) -> None:
    assert parse_birthday(raw, today=TODAY) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "2023-02-29",  # not a leap year
        "--02-30",
        "--04-31",
        "1999-13-01",
        "1999-00-10",
        "1999-01-00",
        "1999-01-32",
        "--13-01",
        "--00-01",
        "0000-02-30",
        "2026-06-17",  # future
        "2999-01-01",
        "1899-12-31",
        "1990-4-23",
        "90-04-23",
        "04/23/1990",
        "23-04",
        "1990-04-23T00:00:00",
        "",
        "--0423",
        "1990-04-23\n1990-04-23",
    ],
)
def test_invalid_birthdays_raise_field_error(raw: str) -> None:
    with pytest.raises(FieldError):
        parse_birthday(raw, today=TODAY)


def test_future_birthday_is_rejected_relative_to_today() -> None:
    tomorrow_plus_one = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=2)
    with pytest.raises(FieldError, match="future"):
        parse_birthday(tomorrow_plus_one.isoformat())


@settings(max_examples=200)
@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=TODAY))
def test_full_birthday_isoformat_round_trips(date: dt.date) -> None:
    bday = parse_birthday(date.isoformat(), today=TODAY)
    assert (bday.year, bday.month, bday.day) == (date.year, date.month, date.day)
    assert bday.isoformat() == date.isoformat()
    assert parse_birthday(bday.isoformat(), today=TODAY) == bday


@settings(max_examples=200)
@given(st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2000, 12, 31)))
def test_yearless_birthday_isoformat_round_trips(date: dt.date) -> None:
    yearless = f"--{date.month:02d}-{date.day:02d}"
    square = f"0000-{date.month:02d}-{date.day:02d}"
    bday = parse_birthday(yearless, today=TODAY)
    assert bday == Birthday(month=date.month, day=date.day, year=None)
    assert bday.isoformat() == yearless
    assert parse_birthday(square, today=TODAY) == bday


@settings(max_examples=200)
@given(st.integers(1, 12), st.integers(1, 31), st.integers(1900, 2026))
def test_birthday_accepted_iff_the_date_exists(month: int, day: int, year: int) -> None:
    raw = f"{year:04d}-{month:02d}-{day:02d}"
    try:
        date = dt.date(year, month, day)
    except ValueError:
        with pytest.raises(FieldError):
            parse_birthday(raw, today=TODAY)
        return
    if date > TODAY + dt.timedelta(days=1):
        with pytest.raises(FieldError):
            parse_birthday(raw, today=TODAY)
    else:
        assert parse_birthday(raw, today=TODAY).isoformat() == raw


# --- metadata ---------------------------------------------------------------------------------

_JSON_SCALARS = (
    st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
_KEYS = st.text(min_size=1, max_size=6)
_STORED = st.dictionaries(_KEYS, _JSON, max_size=6)  # stored metadata never holds nulls
_PATCH = st.dictionaries(_KEYS, st.none() | _JSON, max_size=6)


def test_merge_metadata_example_from_the_issue() -> None:
    assert merge_metadata({"a": 1, "b": 2}, {"b": 3}) == {"a": 1, "b": 3}
    assert merge_metadata({"a": 1, "b": 2}, {"b": None}) == {"a": 1}
    assert merge_metadata({"a": 1}, {"missing": None}) == {"a": 1}
    assert merge_metadata(None, {"a": 1}) == {"a": 1}


def test_merge_metadata_is_shallow() -> None:
    # A nested object is replaced, not merged into.
    assert merge_metadata({"n": {"x": 1, "y": 2}}, {"n": {"y": 3}}) == {"n": {"y": 3}}


@settings(max_examples=300)
@given(_STORED, _PATCH)
def test_merge_metadata_properties(existing: dict[str, Any], patch: dict[str, Any]) -> None:
    before = json.dumps(existing, sort_keys=True)
    merged = merge_metadata(existing, patch)
    assert json.dumps(existing, sort_keys=True) == before  # input not mutated
    for key, value in patch.items():
        if value is None:
            assert key not in merged
        else:
            assert merged[key] == value
    for key, value in existing.items():
        if key not in patch:
            assert merged[key] == value
    assert set(merged) <= set(existing) | set(patch)
    assert None not in merged.values()
    # Applying the same patch again changes nothing.
    assert merge_metadata(merged, patch) == merged


@settings(max_examples=200)
@given(_STORED)
def test_merging_an_empty_patch_is_identity(existing: dict[str, Any]) -> None:
    assert merge_metadata(existing, {}) == existing
    assert merge_metadata({}, existing) == existing


def _payload_size(obj: dict[str, Any]) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def test_metadata_size_cap_boundary() -> None:
    overhead = _payload_size({"a": ""})
    at_cap = {"a": "x" * (METADATA_MAX_BYTES - overhead)}
    assert _payload_size(at_cap) == METADATA_MAX_BYTES
    assert merge_metadata({}, at_cap) == at_cap
    over = {"a": "x" * (METADATA_MAX_BYTES - overhead + 1)}
    with pytest.raises(FieldError) as info:
        merge_metadata({}, over)
    message = str(info.value)
    assert "too large" in message
    assert str(METADATA_MAX_BYTES) in message
    assert str(METADATA_MAX_BYTES + 1) in message


def test_metadata_size_cap_counts_the_merged_result_in_utf8_bytes() -> None:
    half = {"a": "x" * (METADATA_MAX_BYTES // 2)}
    other = {"b": "y" * (METADATA_MAX_BYTES // 2)}
    assert merge_metadata({}, half) == half
    with pytest.raises(FieldError, match="too large"):
        merge_metadata(half, other)
    # Removing a key makes room again.
    assert merge_metadata(half, {"a": None, **other}) == other
    # 8,200 two-byte characters are 16,400 bytes.
    with pytest.raises(FieldError, match="too large"):
        merge_metadata({}, {"e": "é" * 8200})


@pytest.mark.parametrize("value", [[], [1, 2], "text", 3, 1.5, True, None, ({"a": 1},)])
def test_check_metadata_requires_a_json_object(value: Any) -> None:
    with pytest.raises(FieldError, match="JSON object"):
        check_metadata(value)


def test_check_metadata_accepts_objects() -> None:
    assert check_metadata({"a": {"b": [1, "x", None]}}) == {"a": {"b": [1, "x", None]}}
    assert check_metadata({}) == {}


# --- references -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source", ["a", "shopify", "square", "appy_stamp", "loke2", "a" + "b" * 31, "x_1_2"]
)
def test_valid_sources(source: str) -> None:
    assert check_source(source) == source


@pytest.mark.parametrize(
    "source",
    [
        "",
        "Shopify",
        "SHOPIFY",
        "1shop",
        "_shop",
        "shop-ify",
        "shop ify",
        "shop.ify",
        "a" + "b" * 32,  # 33 characters
        "shopify\n",
        "\nshopify",
        " shopify",
        "shopífy",
        None,
        5,
        ["shopify"],
    ],
)
def test_invalid_sources(source: Any) -> None:
    with pytest.raises(FieldError, match="lowercase slug"):
        check_source(source)


@settings(max_examples=300)
@given(st.text(max_size=40) | st.from_regex(SLUG, fullmatch=True))
@example("shopify\n")
@example("a" * 32)
def test_check_source_accepts_exactly_the_slug_language(value: str) -> None:
    if SLUG.fullmatch(value):
        assert check_source(value) == value
    else:
        with pytest.raises(FieldError):
            check_source(value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cus_123", "cus_123"),
        ("  gid://shopify/Customer/1  ", "gid://shopify/Customer/1"),
        (5501, "5501"),
        (0, "0"),
        ("x" * EXTERNAL_ID_MAX, "x" * EXTERNAL_ID_MAX),
    ],
)
def test_valid_external_ids(raw: Any, expected: str) -> None:
    assert check_external_id(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "   ", None, True, False, 1.5, ["a"], {"a": 1}, "x" * (EXTERNAL_ID_MAX + 1)]
)
def test_invalid_external_ids(raw: Any) -> None:
    with pytest.raises(FieldError, match="external_id"):
        check_external_id(raw)


# --- search text ------------------------------------------------------------------------------


def test_build_search_text() -> None:
    assert (
        build_search_text("Jane", "Doe", "Jane@Example.com", "+12125554240")
        == "jane doe\njane@example.com\n12125554240"
    )
    assert build_search_text("Jane", None, None, "+12125554240") == "jane\n\n12125554240"
    assert build_search_text(None, "Doe", "a@x.com", None) == "doe\na@x.com\n"
    assert build_search_text(None, None, None, None) == "\n\n"


@given(
    st.text(max_size=10) | st.none(),
    st.text(max_size=10) | st.none(),
    st.text(max_size=10) | st.none(),
)
@example("ÉMILE", "Zola", "E@X.COM")
def test_search_text_is_lower_case_and_contains_the_full_name(
    first: str | None, last: str | None, email: str | None
) -> None:
    text = build_search_text(first, last, email, "+1 (212) 555-4240")
    assert text == text.lower()
    full = " ".join(p for p in (first, last) if p).lower()
    assert full in text
    assert text.endswith("\n12125554240")


def test_phone_digits() -> None:
    assert phone_digits("+1 (212) 555-4240") == "12125554240"
    assert phone_digits(None) == ""
    assert phone_digits("") == ""
