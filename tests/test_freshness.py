"""RFC 9111 decisions of a shared cache, as plain functions (the cache policy's arithmetic)."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from gateway.freshness import current_age, directives, freshness, storable

NOW = 1_800_000_000.0


def http_date(at: float) -> str:
    return formatdate(at, usegmt=True)


def test_directives_are_case_insensitive_keep_arguments_and_take_the_first_duplicate() -> None:
    assert directives('Max-Age=60, private="Set-Cookie", max-age=5, no-cache') == {"max-age": "60", "private": "Set-Cookie", "no-cache": None}
    assert directives(None) == {} and directives("") == {}


@pytest.mark.parametrize(
    ("status", "response_cc", "authorization", "set_cookie", "expected"),
    [
        (200, "", False, False, True),  # heuristically cacheable status
        (201, "", False, False, False),  # not heuristically cacheable, nothing explicit
        (201, "max-age=60", False, False, True),
        (200, "no-store", False, False, False),
        (200, "private", False, False, False),
        (200, "max-age=60", True, False, False),  # §3.5: Authorization needs public or s-maxage
        (200, "public, max-age=60", True, False, True),
        (200, "s-maxage=60", True, False, True),
        (200, "max-age=60", False, True, False),  # Set-Cookie: not unless the route allows it
        (404, "", False, False, True),
        (500, "", False, False, False),
    ],
)
def test_what_a_shared_cache_may_store(status: int, response_cc: str, authorization: bool, set_cookie: bool, expected: bool) -> None:
    assert storable(status, "GET", {}, directives(response_cc), authorization, set_cookie, False, False) is expected


def test_only_get_and_head_are_stored_and_a_request_no_store_wins() -> None:
    assert not storable(200, "POST", {}, directives("max-age=60"), False, False, False, False)
    assert storable(200, "HEAD", {}, directives("max-age=60"), False, False, False, False)
    assert not storable(200, "GET", directives("no-store"), directives("max-age=60"), False, False, False, False)


def test_override_stores_what_the_upstream_marked_private_but_never_errors() -> None:
    assert storable(200, "GET", {}, directives("private, no-store"), False, False, False, True)
    assert not storable(502, "GET", {}, directives(""), False, False, False, True)


def test_freshness_prefers_s_maxage_then_max_age_then_expires_then_the_route_ttl() -> None:
    headers = {"Date": http_date(NOW), "Expires": http_date(NOW + 500)}
    assert freshness(headers, directives("max-age=60, s-maxage=120"), 200, NOW, 30, False).lifetime == 120
    assert freshness(headers, directives("max-age=60"), 200, NOW, 30, False).lifetime == 60
    assert freshness(headers, directives(""), 200, NOW, 30, False).lifetime == 500
    assert freshness({}, directives(""), 200, NOW, 30, False).lifetime == 30
    assert freshness({}, directives("max-age=60"), 200, NOW, 30, True).lifetime == 30  # override


def test_an_invalid_expires_means_already_stale_and_an_invalid_max_age_is_ignored() -> None:
    assert freshness({"Expires": "0"}, {}, 200, NOW, None, False).lifetime == 0
    assert freshness({}, directives("max-age=soon"), 200, NOW, 45, False).lifetime == 45


def test_without_explicit_freshness_a_tenth_of_the_time_since_last_modified_capped_at_a_day() -> None:
    headers = {"Date": http_date(NOW), "Last-Modified": http_date(NOW - 1000)}
    assert freshness(headers, {}, 200, NOW, None, False).lifetime == 100
    old = {"Date": http_date(NOW), "Last-Modified": http_date(NOW - 10_000_000)}
    assert freshness(old, {}, 200, NOW, None, False).lifetime == 86400


def test_current_age_corrects_for_the_age_header_clock_skew_and_residence() -> None:
    headers = {"Age": "10", "Date": http_date(NOW - 5)}
    # requested at NOW-1, received at NOW, read 30 s later
    assert current_age(headers, NOW - 1, NOW, NOW + 30) == pytest.approx(max(5, 10 + 1) + 30)
