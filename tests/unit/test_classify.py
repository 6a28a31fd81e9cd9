"""Classification: the first action whose match fits names the request."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from drawdown.budgets import claims_for, window
from drawdown.classify import RequestView, addressed, classify, unrecorded
from drawdown.policy import load_policy
from drawdown.policy.match import canonical_host, compile_host
from mitmproxy.http import Headers

POLICY = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/api/customers/{id}"}, cost: {usd: 0.002}}
  - {kind: refund.big, match: {host: api.stripe.com, method: POST, path: /v1/refunds, json: {amount: {gt: 5000}}}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}}
  - {kind: search, match: {host: api.search.example, query: {q: {exists: true}}}}
  - {kind: repo.write, match: {host: api.github.com, method: [PUT, POST], path: "/repos/*/contents/tests/**"}}
budgets:
  - {scope: "tenant:*", per: day, usd: 100}
  - {scope: "agent:*/run:*", usd: 0.5}
  - {scope: "agent:support-*/run:*", actions: [refund.*], requests: 3}
"""


def view(
    method: str, host: str, path: str, body: object = None, query: dict[str, str] | None = None
) -> RequestView:
    return RequestView(
        method,
        host,
        443,
        path,
        query or {},
        {},
        json.dumps(body).encode() if body is not None else b"",
    )


def test_first_match_wins_with_body_conditions(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    assert classify(policy, view("POST", "api.openai.com", "/v1/chat/completions")).kind == "llm"
    assert (
        classify(policy, view("POST", "api.stripe.com", "/v1/refunds", {"amount": 9000})).kind
        == "refund.big"
    )
    assert (
        classify(policy, view("POST", "api.stripe.com", "/v1/refunds", {"amount": 100})).kind
        == "refund.issue"
    )
    assert (
        classify(policy, view("POST", "api.stripe.com", "/v1/refunds", None)).kind == "refund.issue"
    )
    crm = classify(policy, view("GET", "crm.example.com", "/api/customers/c-9"))
    assert crm.kind == "crm.read" and crm.path_params == {"id": "c-9"}
    assert classify(policy, view("DELETE", "crm.example.com", "/api/customers/c-9")).action is None
    assert (
        classify(policy, view("GET", "api.search.example", "/s", query={"q": "x"})).kind == "search"
    )
    assert classify(policy, view("GET", "api.search.example", "/s")).action is None
    assert (
        classify(policy, view("PUT", "api.github.com", "/repos/app/contents/tests/unit/a.py")).kind
        == "repo.write"
    )
    assert (
        classify(policy, view("PUT", "api.github.com", "/repos/app/contents/src/a.py")).action
        is None
    )
    assert classify(policy, view("GET", "example.org", "/")).action is None


def test_budget_instances_per_scope_and_action(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    levels = {"tenant": "acme", "agent": "support-2", "run": "r7"}
    now = 1_700_000_123.0
    llm = claims_for(policy, levels, "llm", now)
    assert [(c.budget, c.scope) for c in llm] == [
        ("tenant:* per day", "tenant:acme"),
        ("agent:*/run:*", "agent:support-2/run:r7"),
    ]
    assert llm[0].window_start == 1_699_920_000 and llm[0].window_end == 1_700_006_400
    refund = claims_for(policy, levels, "refund.issue", now)
    assert [c.scope for c in refund] == [
        "tenant:acme",
        "agent:support-2/run:r7",
        "agent:support-2/run:r7",
    ]
    assert refund[2].limit_requests == 3
    # No run level: run budgets do not apply.
    assert [c.budget for c in claims_for(policy, {"tenant": "acme", "agent": "x"}, "llm", now)] == [
        "tenant:* per day"
    ]


def test_windows() -> None:
    assert window(None, 123.0) == (0, None)
    assert window("minute", 125.0) == (120, 180)
    assert window("hour", 3 * 3600 + 5) == (3 * 3600, 4 * 3600)
    start, end = window("month", 1_709_251_200.0 + 10)  # 2024-03-01T00:00:10Z
    assert (start, end) == (1_709_251_200, 1_709_251_200 + 31 * 86400)
    feb = window("month", 1_706_745_600.0 + 5)  # 2024-02-01 (leap year)
    assert feb[1] - feb[0] == 29 * 86400
    # 0.4 µs before 2027: still December, as the day window says (it was January).
    new_year = 1_798_761_600.0  # 2027-01-01T00:00:00Z
    last = new_year - 4e-7
    assert window("day", last)[1] == new_year
    assert window("month", last) == (new_year - 31 * 86400, new_year)


def test_escaped_paths_read_as_servers_read_them() -> None:
    """%-escapes of letters, digits and -._~ mean the characters themselves to every server
    (RFC 3986 §2.3); %2F, other escapes and dot segments are left for the ambiguity check."""
    from drawdown.classify import normalize_path

    assert normalize_path("/docs/%6Dcp") == "/docs/mcp"
    assert normalize_path("/customers/%63%2d7%7E") == "/customers/c-7~"
    assert normalize_path("/v1%2Frefunds/%25/%20") == "/v1%2Frefunds/%25/%20"
    assert normalize_path("/x/%2e%2e/admin") == "/x/../admin"  # then refused if it changes


def test_a_path_another_action_would_read_is_refused_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    p = load_policy(tmp_path / "p.yaml")
    refund = {"amount": 100}
    assert classify(p, view("POST", "api.stripe.com", "/v1/refunds", refund)).path_error is None
    for path in ("/v1%2Frefunds", "/v1/refunds/x/..", "/v1/./x/../refunds"):
        found = classify(p, view("POST", "api.stripe.com", path, refund))
        assert found.path_error is not None and "/v1/refunds" in found.path_error, path
    # Decoded or not, a path that stays the same action's is no problem, nor one whose
    # resolved reading no action names by path (a%2Fb: two segments, no action's)...
    for path in ("/api/customers/c%207", "/api/customers/a%2Fb"):
        same = classify(p, view("GET", "crm.example.com", path))
        assert same.path_error is None and same.kind == "crm.read", path
    # ...but an LLM endpoint hidden behind a %2F (host-only action: same kind) is: the
    # meter would not know it for chat completions, and the call would go unmetered.
    hidden = classify(p, view("POST", "api.openai.com", "/v1/chat%2Fcompletions", {}))
    assert hidden.action is not None and hidden.path_error is not None


def test_an_escaped_slash_inside_a_segment_is_read_as_the_action_names_it(tmp_path: Path) -> None:
    """GitLab's API names a project `group%2Fproject` in one segment and never splits it.
    Resolved, the path names no action (only a catch-all takes it): no escape from the
    action that names the raw path, so it is not refused."""
    (tmp_path / "p.yaml").write_text(
        "actions:\n"
        "  - {kind: mr.create, match: {host: gitlab.example.com, method: POST,"
        ' path: "/api/v4/projects/{project}/merge_requests"}}\n'
        "  - {kind: other, match: {}}\n"
    )
    p = load_policy(tmp_path / "p.yaml")
    found = classify(
        p, view("POST", "gitlab.example.com", "/api/v4/projects/group%2Fapp/merge_requests")
    )
    assert found.path_error is None and found.kind == "mr.create"
    assert found.path_params == {"project": "group%2Fapp"}


READINGS = """
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: gemini, provider: gemini, match: {host: generativelanguage.googleapis.com}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}}
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/api/customers/{id}"}}
  - {kind: crm.delete, match: {host: crm.example.com, method: DELETE}}
  - {kind: mr.create, match: {host: gitlab.example.com, method: POST, path: "/api/v4/projects/{project}/merge_requests"}}
  - {kind: internal, match: {host: "10.0.0.5"}}
  - {kind: other, match: {}}
"""


def readings_policy(tmp_path: Path) -> Any:
    (tmp_path / "p.yaml").write_text(READINGS)
    return load_policy(tmp_path / "p.yaml")


def sent(
    method: str,
    target: str,
    path: str,
    names: tuple[tuple[str, str], ...] = (),
    headers: Mapping[str, str] | None = None,
    query: dict[str, str] | None = None,
    body: bytes = b"",
) -> RequestView:
    """A request as the proxy builds its view: sent to `target`, naming `names` besides."""
    host, address, host_error = addressed(target, 443, names)
    return RequestView(
        method, host, 443, path, query or {}, headers or {}, body,
        address=address, host_error=host_error,
    )  # fmt: skip


def test_a_host_is_matched_as_dns_and_certificates_read_it(tmp_path: Path) -> None:
    """`curl https://api.openai.com./v1/chat/completions` (CONNECT api.openai.com.:443) matched
    no action (patterns were only lower-cased) and went through as an unknown host: unmetered,
    its denied model unchecked. A host is read lower-case, without the trailing dot of a fully
    qualified name, an IDN in its ASCII form, an IPv6 address in one spelling; so are patterns."""
    p = readings_policy(tmp_path)
    for target in ("api.openai.com.", "API.OpenAI.com", "Api.OpenAI.Com."):
        found = classify(p, sent("POST", target, "/v1/chat/completions"))
        assert found.kind == "llm" and found.host_error is None, target
    assert canonical_host("bücher.example") == canonical_host("xn--bcher-kva.example.")
    assert canonical_host("0:0::1") == "::1" and canonical_host("10.0.0.5") == "10.0.0.5"
    assert compile_host("api.openai.com.").matches(canonical_host("API.openai.com."), 443)
    assert compile_host("bücher.example").matches(canonical_host("xn--bcher-kva.example"), 443)
    assert compile_host("*.BÜCHER.example").matches(canonical_host("api.bücher.example"), 443)


def test_a_request_that_names_two_hosts_is_refused(tmp_path: Path) -> None:
    """CONNECT crm.example.com with SNI and Host api.stripe.com took a refund to the upstream
    (it routes by the name) while the ledger said crm.example.com; even under `unknown_hosts:
    deny`. A Host header, TLS SNI, absolute-form URI or :authority naming another host than
    the one the request is sent to (and classified by) is refused, whatever the policy."""
    p = readings_policy(tmp_path)
    refund = b'{"amount": 10000}'
    for names in (
        (("TLS SNI", "api.stripe.com"), ("Host header", "api.stripe.com")),
        (("Host header", "api.stripe.com"),),
        (("request URI", "api.stripe.com"),),
        (("Host header", "crm.example.com:8443"),),  # the port too, when given
        (("Host header", "crm.example.com, api.stripe.com"),),  # two Host headers, folded
        (("Host header", "user@api.stripe.com"),),
    ):
        found = classify(p, sent("POST", "crm.example.com", "/v1/refunds", names, body=refund))
        assert found.host_error is not None, names
        assert found.host_error.startswith("the request goes to crm.example.com but its ")
        assert names[0][0] in found.host_error and unrecorded(found.host_error)
    # The same host, however written, is one host: no refusal, the action it names.
    same = (
        ("TLS SNI", "api.stripe.com"),
        ("Host header", "API.stripe.com.:443"),
        ("request URI", "api.stripe.com"),
        (":authority", "api.stripe.com."),
    )
    found = classify(p, sent("POST", "api.stripe.com.", "/v1/refunds", same, body=refund))
    assert found.host_error is None and found.kind == "refund.issue"
    # An unknown host naming a known one is refused too (unknown_hosts: deny would take it).
    crm = (("TLS SNI", "crm.example.com"), ("Host header", "crm.example.com"))
    assert classify(p, sent("DELETE", "api.openai.com", "/api/customers/1", crm)).host_error


def test_a_request_sent_to_an_ip_address_is_classified_by_the_name_it_gives(
    tmp_path: Path,
) -> None:
    """CONNECT 10.9.8.7:443 with SNI and Host api.openai.com went through as an unknown host.
    The upstream's certificate is checked against that name and a shared server serves that
    site: it is classified by it (a client resolving names itself is no evasion). An action
    naming the address itself (not a mere `*`) that would classify it otherwise refuses it."""
    p = readings_policy(tmp_path)
    names = (("TLS SNI", "api.openai.com"), ("Host header", "api.openai.com"))
    found = classify(p, sent("POST", "10.9.8.7", "/v1/chat/completions", names))
    assert found.kind == "llm" and found.host_error is None
    assert addressed("10.9.8.7", 443, names) == ("api.openai.com", "10.9.8.7", None)
    # Two names for one address: which one the upstream acts on, no one can tell.
    two = (("TLS SNI", "api.openai.com"), ("Host header", "crm.example.com"))
    assert "its Host header names crm.example.com" in str(addressed("10.9.8.7", 443, two)[2])
    # The address a policy names for itself is not escaped by naming another host.
    named = classify(p, sent("POST", "10.0.0.5", "/v1/chat/completions", names))
    assert named.kind == "llm" and named.host_error is not None
    assert "10.0.0.5 by address but names api.openai.com" in named.host_error
    # An address only a catch-all takes is classified by its name, unrefused.
    (tmp_path / "star.yaml").write_text(
        "actions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n"
        '  - {kind: any, match: {host: "*"}}\n'
    )
    star = load_policy(tmp_path / "star.yaml")
    assert classify(star, sent("POST", "10.0.0.5", "/v1/models", names)).host_error is None


def test_a_path_a_server_reads_as_another_actions_is_refused(tmp_path: Path) -> None:
    """`POST /v1//refunds`, `//v1/refunds`, `/V1/Refunds` and `/v1/refunds;x=1` went through as
    unknown calls: nginx merges slashes, Express and ASP.NET route in any case, Spring drops
    `;params`, and each ran the denied refund. Read so, a path another action names is refused
    (400), as a %2F or dot segment is; ordinary paths and GitLab's `%2F` are not."""
    p = readings_policy(tmp_path)
    refund = b'{"amount": 10000}'
    for path, how in (
        ("/v1//refunds", "merges repeated slashes"),
        ("//v1/refunds", "merges repeated slashes"),
        ("/V1/Refunds", "matches paths in any case"),
        ("/v1/refunds;x=1", "drops ;parameters"),
        ("/v1/x;y/../refunds", "decodes its escapes or dot segments"),
        ("/v1/..;/v1/refunds", "decodes its escapes or dot segments and drops ;parameters"),
        ("/V1//Refunds;jsessionid=1", "drops ;parameters and merges repeated slashes and matches"),
    ):
        found = classify(p, sent("POST", "api.stripe.com", path, body=refund))
        assert found.kind == "other" and found.path_error is not None, path
        assert f"the path {path} reads as /v1/refunds to a server that {how}" in found.path_error
    for method, host, path, kind in (
        ("POST", "api.stripe.com", "/v1/refunds", "refund.issue"),
        ("POST", "api.stripe.com", "/v1/refunds/", "refund.issue"),
        ("GET", "crm.example.com", "/api/customers/CUS-7", "crm.read"),  # a capital in a capture
        ("GET", "crm.example.com", "/api/customers/a;b", "crm.read"),  # the same action either way
        ("POST", "gitlab.example.com", "/api/v4/projects/Group%2FApp/merge_requests", "mr.create"),
        ("POST", "generativelanguage.googleapis.com", "/v1beta/models/g:generateContent", "gemini"),
        ("POST", "api.openai.com", "/V1/chat/completions", "llm"),  # providers route as written
        ("GET", "api.github.com", "/Repos//x;y", "other"),  # no action names a path there
    ):
        found = classify(p, sent(method, host, path))
        assert found.kind == kind and found.path_error is None, path
    # An LLM endpoint a `;x` hides from the meter (host-only action) is refused, as a %2F is.
    hidden = classify(p, sent("POST", "api.openai.com", "/v1/chat/completions;x", body=b"{}"))
    assert hidden.kind == "llm" and hidden.path_error is not None


def test_a_method_override_another_action_claims_is_refused(tmp_path: Path) -> None:
    """`POST /api/customers/1` with `X-HTTP-Method-Override: DELETE` (or X-Method-Override,
    X-HTTP-Method, `?_method=DELETE`, a `_method` form field) was allowed as an unknown call
    though DELETE is denied: Google's APIs, ASP.NET, Express, Rails, Laravel and Spring run it
    as a DELETE. Read so, a method another action names is refused; an override no action
    tells apart, or naming the method sent, is not."""
    p = readings_policy(tmp_path)
    form = {"content-type": "application/x-www-form-urlencoded"}
    for headers, query, body, how in (
        ({"x-http-method-override": "DELETE"}, {}, b"", "the X-HTTP-Method-Override header"),
        ({"x-method-override": "delete"}, {}, b"", "the X-Method-Override header"),
        ({"x-http-method": "DELETE"}, {}, b"", "the X-HTTP-Method header"),
        ({}, {"_method": "DELETE"}, b"", "a _method query parameter"),
        (form, {}, b"name=x&_method=DELETE", "a _method form field"),
        (form, {}, b"_method=PUT&_method=DELETE", "a _method form field"),  # PHP reads the last
    ):
        for method in ("POST", "GET") if not body else ("POST",):  # a POST's body, as servers
            request = sent(method, "crm.example.com", "/api/customers/1", (), headers, query, body)
            found = classify(p, request)
            assert found.path_error == (
                f"the method {method} reads as DELETE to a server that honours {how}, which this "
                "policy classifies otherwise; send the request with the method the upstream "
                "should run"
            ), (headers, query, body)
            assert unrecorded(found.path_error) is (how != "a _method query parameter")
    # `?_method=POST&_method=DELETE`: the proxy keeps the first, PHP reads the last.
    repeated = replace(sent("POST", "crm.example.com", "/api/customers/1", query={"_method": "POST"}),
                       query_repeats=frozenset({"_method"}))  # fmt: skip
    assert "given more than once" in str(classify(p, repeated).path_error)
    for headers in ({"x-http-method-override": "PATCH"}, {"x-http-method-override": "post"}):
        found = classify(p, sent("POST", "crm.example.com", "/api/customers/1", (), headers))
        assert found.kind == "other" and found.path_error is None, headers
    # As the proxy's view carries them (mitmproxy's Headers): the same, each header read.
    two = Headers(((b"X-Http-Method-Override", b"PATCH"), (b"x-http-method-override", b"DELETE")))
    found = classify(p, sent("POST", "crm.example.com", "/api/customers/1", (), two))
    assert "reads as DELETE to a server that honours the X-HTTP" in str(found.path_error)


def test_an_ordinary_request_is_classified_once(tmp_path: Path, monkeypatch: Any) -> None:
    """The readings are on every request's path: one with no `%`, dot segment, `//`, `;`,
    capital or override classifies once, reading no more than it did."""
    import drawdown.classify as module

    p = readings_policy(tmp_path)
    calls: list[str] = []
    first_match = module._first_match

    def counted(policy: Any, view: RequestView) -> Any:
        calls.append(view.path)
        return first_match(policy, view)

    monkeypatch.setattr(module, "_first_match", counted)
    names = (("TLS SNI", "api.stripe.com"), ("Host header", "api.stripe.com"))
    for path in ("/v1/refunds", "/v1/customers/cus_7/sources", "/v1/refunds/"):
        calls.clear()
        assert classify(p, sent("POST", "api.stripe.com", path, names)).path_error is None
        assert calls == [path]
    calls.clear()
    classify(p, sent("POST", "api.stripe.com", "/V1/refunds"))
    assert calls == ["/V1/refunds", "/V1/refunds"]  # one reading: in any case
