"""`GET /metrics` on the proxy's own port, as Prometheus scrapes it, from a real `drawdown run`
driven by the openai SDK: what it counts is what the ledger recorded and charged, a rejected
policy edit shows, and `--workers` answers for every worker whichever one is scraped."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import bcrypt
import openai
import pytest
from drawdown import __version__
from mitmproxy.version import VERSION
from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxy import DrawdownProcess
from tests.support.standin import Reply, StandIn

pytestmark = pytest.mark.e2e

Factory = Callable[..., DrawdownProcess]

POLICY = """
mode: enforce
identity:
  agent: [{value: research}]
  run: [{value: r1}]
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
budgets:
  - {scope: "agent:*/run:*", requests: 3}
"""

# A scrape addresses the proxy itself: no proxy for it, whatever the environment says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(proxy: DrawdownProcess) -> Samples:
    with _DIRECT.open(f"http://127.0.0.1:{proxy.address[1]}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(
    proxy: DrawdownProcess, done: Callable[[Samples], bool], timeout: float = 10.0
) -> Samples:
    """Scrape until `done` holds: the writer counts a batch just after its callers are woken,
    so the agent may have its answer a moment before the metrics count it."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(proxy)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def chat(client: openai.OpenAI) -> int:
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.APIStatusError as refused:
        return refused.status_code
    return 200


def allowed(samples: Samples) -> float:
    return sample(samples, "drawdown_decisions_total", decision="allow", reason="", action="llm")


def refused(samples: Samples) -> float:
    return sample(
        samples,
        "drawdown_decisions_total",
        decision="deny",
        reason="budget_exhausted",
        action="llm",
    )


def test_a_scrape_counts_what_the_ledger_recorded_and_charged(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY)
    with proxy.openai_client(max_retries=0) as client:
        statuses = [chat(client) for _ in range(4)]
    assert statuses == [200, 200, 200, 402]
    proxy.wait_for_query(
        "SELECT COUNT(*) FROM decisions WHERE completed_at IS NULL", until=lambda r: r[0][0] == 0
    )
    samples = scrape_until(proxy, lambda s: allowed(s) == 3 and refused(s) == 1)
    assert (allowed(samples), refused(samples)) == (3, 1)
    ((spent_nanos, tokens_in, tokens_out),) = proxy.query(
        "SELECT SUM(actual_usd), SUM(tokens_in), SUM(tokens_out) FROM decisions"
    )
    assert spent_nanos > 0 and tokens_in > 0 and tokens_out > 0
    charged = sample(samples, "drawdown_charged_usd_total", provider="openai", action="llm")
    assert round(charged * 1e9) == spent_nanos
    tokens = "drawdown_tokens_total"
    assert sample(samples, tokens, provider="openai", direction="input") == tokens_in
    assert sample(samples, tokens, provider="openai", direction="output") == tokens_out
    assert sample(samples, "drawdown_holds_open") == 0
    assert sample(samples, "drawdown_ledger_transaction_seconds_count") >= 4
    # What it runs: `drawdown --version`'s figures.
    assert sample(samples, "drawdown_build_info", version=__version__, mitmproxy=VERSION) == 1
    # The process's own (one process: under --workers a scrape is any worker's).
    assert sample(samples, "process_resident_memory_bytes") > 50 * 2**20
    assert sample(samples, "process_open_fds") > 0
    # drawdown's own time before each forwarded call, and the upstream's before its answer.
    assert sample(samples, "drawdown_decision_seconds_count") == 3
    assert sample(samples, "drawdown_decision_seconds_sum") > 0
    assert sample(samples, "drawdown_upstream_seconds_count", provider="openai") == 3
    assert sample(samples, "drawdown_ledger_errors_total", operation="reserve") == 0
    # Prometheus 3 asks for OpenMetrics first: answered in it.
    request = urllib.request.Request(
        f"http://127.0.0.1:{proxy.address[1]}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.4"},
    )
    with _DIRECT.open(request, timeout=10) as answer:
        assert answer.headers["content-type"].startswith("application/openmetrics-text")
        assert answer.read().decode().endswith("# EOF\n")
    # A version it cannot read (which raised inside the hook, and mitmproxy answered 502):
    # the default format.
    for accept in ("text/plain;version=x.y", "application/openmetrics-text; version=abc"):
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy.address[1]}/metrics", headers={"Accept": accept}
        )
        with _DIRECT.open(request, timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    # A scrape is no agent's call: nothing recorded for it.
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(4,)]

    # A broken edit shows until a good one is applied; the last good policy stays in force.
    proxy.reload_policy(POLICY.replace("requests: 3", "requests: [3"))
    proxy.wait_for_log("policy edit rejected")
    samples = scrape(proxy)
    assert sample(samples, "drawdown_policy_edit_rejected") == 1
    assert sample(samples, "drawdown_policy_reloads_total", result="rejected") == 1
    proxy.reload_policy(POLICY.replace("requests: 3", "requests: 30"))
    proxy.wait_for_log("policy reloaded")
    samples = scrape(proxy)
    assert sample(samples, "drawdown_policy_edit_rejected") == 0
    assert sample(samples, "drawdown_policy_reloads_total", result="applied") == 1


def test_a_scrape_needs_no_proxy_credentials(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """As the probes: behind `proxyauth` a scrape got 407 (mitmproxy's ProxyAuth answers it
    before drawdown's `request` hook, which answered only a flow with no answer yet)."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"agent:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}\n")
    proxy = drawdown_proxy(
        POLICY, proxy_auth=("agent", "pw"), extra_args=["--set", f"proxyauth=@{htpasswd}"]
    )
    assert sample(scrape(proxy), "drawdown_holds_open") == 0
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(0,)]


def test_a_ledger_lost_with_a_call_in_flight_leaves_no_hold_open(
    drawdown_proxy: Factory, standin: StandIn, tmp_path: Path
) -> None:
    """Its hold was in the deleted file: never to be settled here, so no longer open."""
    db = tmp_path / "ledger.db"
    proxy = drawdown_proxy(POLICY, db=db, extra_args=["--set", "drawdown_maintenance_interval=0.2"])
    standin.script("POST", "/v1/chat/completions", Reply(delay_before_headers=3.0))
    with proxy.openai_client(max_retries=0) as client:
        call = threading.Thread(target=chat, args=(client,))
        call.start()
        held = scrape_until(proxy, lambda s: sample(s, "drawdown_holds_open") == 1)
        assert sample(held, "drawdown_holds_open") == 1
        for path in tmp_path.glob("ledger.db*"):
            path.unlink()
        proxy.wait_for_log("was deleted under the running proxy")
        call.join(30)
    assert sample(scrape(proxy), "drawdown_holds_open") == 0


def test_metrics_off_answers_404_and_counts_nothing(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    proxy = drawdown_proxy(POLICY, extra_args=["--set", "drawdown_metrics=false"])
    with pytest.raises(urllib.error.HTTPError) as off:
        scrape(proxy)
    assert off.value.code == 404
    assert proxy.query("SELECT COUNT(*) FROM decisions") == [(0,)]


def test_any_worker_scraped_answers_for_all_of_them(
    drawdown_proxy: Factory, standin: StandIn
) -> None:
    """`--workers 2`: the kernel hands each connection, a scrape's too, to either worker;
    every scrape counts both workers' calls (prometheus_client's multiprocess mode)."""
    proxy = drawdown_proxy(
        POLICY.replace("requests: 3", "requests: 10"), extra_args=["--workers", "2"]
    )
    statuses = []
    for _ in range(16):  # a fresh connection each time: spread over the workers
        with proxy.openai_client(max_retries=0) as client:
            statuses.append(chat(client))
    assert statuses.count(200) == 10 and statuses.count(402) == 6
    # Both workers made holds: a scrape of either alone would count its own part.
    assert proxy.query("SELECT COUNT(DISTINCT process_id) FROM holds") == [(2,)]
    first = scrape_until(proxy, lambda s: allowed(s) == 10 and refused(s) == 6)
    assert (allowed(first), refused(first)) == (10, 6)
    for _ in range(10):  # each scrape a new connection, to one worker or the other
        samples = scrape(proxy)
        assert (allowed(samples), refused(samples)) == (10, 6)
        assert sample(samples, "drawdown_holds_open") == 0
        assert ("process_resident_memory_bytes", ()) not in samples  # whose would it be?
        assert sample(samples, "drawdown_build_info", version=__version__, mitmproxy=VERSION) == 1
    proxy.stop()
