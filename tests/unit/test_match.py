"""Matchers: globs, hosts, paths with captures, scopes, conditions."""

from __future__ import annotations

from decimal import Decimal

import pytest
from drawdown.policy.match import (
    compile_condition,
    compile_host,
    compile_path,
    compile_scope,
    dig,
    holds,
    missing,
)


@pytest.mark.parametrize(
    ("pattern", "host", "port", "expected"),
    [
        ("api.openai.com", "api.openai.com", 443, True),
        ("api.openai.com", "API.OpenAI.com", 8443, True),  # port ignored unless given
        ("api.openai.com", "api.openai.com.evil", 443, False),
        ("*.openai.com", "api.openai.com", 443, True),
        ("*.openai.com", "openai.com", 443, False),
        ("localhost:8443", "localhost", 8443, True),
        ("localhost:8443", "localhost", 443, False),
    ],
)
def test_host(pattern: str, host: str, port: int, expected: bool) -> None:
    assert compile_host(pattern).matches(host, port) is expected


@pytest.mark.parametrize("bad", ["", "http://x", "a b", "host:99999", "host:x"])
def test_bad_host(bad: str) -> None:
    with pytest.raises(ValueError):
        compile_host(bad)


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", {}),
        ("/v1/chat/completions", "/v1/chat/completions/", {}),
        ("/v1/*", "/v1/chat", {}),
        ("/v1/*", "/v1/chat/completions", None),  # * is one segment
        ("/v1/**", "/v1/chat/completions", {}),  # ** spans segments
        ("/repos/*/contents/tests/**", "/repos/app/contents/tests/unit/test_x.py", {}),
        ("/repos/*/contents/tests/**", "/repos/app/contents/src/x.py", None),
        ("/api/customers/{id}", "/api/customers/c-42", {"id": "c-42"}),
        ("/api/customers/{id}", "/api/customers/c-42/orders", None),
        ("/api/{kind}/{id}", "/api/orders/7", {"kind": "orders", "id": "7"}),
    ],
)
def test_path(pattern: str, path: str, expected: dict[str, str] | None) -> None:
    assert compile_path(pattern).match(path) == expected


def test_path_errors() -> None:
    for bad in ("v1/x", "/a/{id}/{id}", "/a/{1x}"):
        with pytest.raises(ValueError):
            compile_path(bad)


def test_scope_patterns_and_instances() -> None:
    scope = compile_scope("agent:support-*/run:*")
    request = {"tenant": "acme", "agent": "support-7", "run": "r1"}
    assert scope.matches(request)
    assert scope.instance(request) == "agent:support-7/run:r1"  # tenant not named: ignored
    assert not scope.matches({"agent": "support-7"})  # names run, request has none: no match
    assert not scope.matches({"agent": "research", "run": "r1"})
    assert compile_scope("*").matches({}) and compile_scope("*").instance(request) == ""
    # Levels are canonicalised into tenant/workflow/agent/run order.
    assert compile_scope("run:*/tenant:*").level_names == ("tenant", "run")
    for bad in ("agnt:*", "agent", "agent:", "agent:a/agent:b"):
        with pytest.raises(ValueError):
            compile_scope(bad)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ({"eq": 5}, 5, True),
        ({"eq": 5}, 5.0, True),
        ({"eq": "5"}, 5, True),  # one field as text, the other as a number: numbers
        ({"eq": 4242}, "4242", True),  # a form body's amount=4242
        ({"in": [4242]}, "4242", True),  # `deny … in: [4242]` must fire on a form body
        ({"not_in": [4242]}, "4242.0", False),
        ({"ne": 4242}, "4242", False),
        ({"eq": 4242}, "4242x", False),
        ({"eq": "05"}, "5", False),  # text against text compares as text
        ({"ne": "a"}, "b", True),
        ({"ne": "a"}, missing(), True),
        ({"gt": 5000}, 5001, True),
        ({"gt": 5000}, 5000, False),
        ({"gte": 5000}, 5000, True),
        ({"lt": Decimal("0.5")}, 0.25, True),
        ({"lte": 10}, "10", True),  # query strings compare as numbers
        ({"gt": 5}, "abc", False),
        ({"gt": 5}, missing(), False),
        ({"gt": 5}, True, False),  # booleans are not numbers
        ({"in": ["gold", "silver"]}, "gold", True),
        ({"in": ["gold"]}, "bronze", False),
        ({"not_in": ["gold"]}, "bronze", True),
        ({"not_in": ["gold"]}, missing(), True),
        ({"regex": "^tests/"}, "tests/test_a.py", True),
        ({"regex": "^tests/"}, "src/a.py", False),
        ({"regex": "x"}, 5, False),
        ({"exists": True}, 0, True),
        ({"exists": True}, missing(), False),
        ({"exists": False}, missing(), True),
        ({"gt": 1, "lt": 3}, 2, True),
        ({"gt": 1, "lt": 3}, 3, False),
        ("gold", "gold", True),  # a bare value means eq
    ],
)
def test_operators(spec: object, value: object, expected: bool) -> None:
    assert compile_condition(spec)(value) is expected


@pytest.mark.parametrize(
    "spec", [{"gtt": 1}, {"in": "x"}, {"regex": "("}, {"gt": "abc"}, {"exists": "yes"}]
)
def test_bad_conditions(spec: object) -> None:
    with pytest.raises(ValueError):
        compile_condition(spec)


def test_dig_nested_objects_and_arrays() -> None:
    doc = {"metadata": {"tier": "gold"}, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 9}]}
    assert dig(doc, "metadata.tier") == "gold"
    assert dig(doc, "items.1.sku") == "b"
    assert dig(doc, "items.-1.qty") == 9
    assert dig(doc, "items.5.sku") is missing()
    assert dig(doc, "metadata.nope") is missing()
    assert holds(compile_condition({"gt": 5}), dig(doc, "items.*.qty"))
    assert not holds(compile_condition({"gt": 50}), dig(doc, "items.*.qty"))
