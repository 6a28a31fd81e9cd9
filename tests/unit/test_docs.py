"""The user documentation names files a reader will open: each must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from drawdown import metrics
from drawdown.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "BENCHMARKS.md", "addon/drawdown/meter/ESTIMATION.md"]
# Paths of the project's own folders, as prose and code blocks name them.
PATH = re.compile(r"(?<![\w/.-])((?:tests|scripts|addon|policies|benchmarks)/[\w./-]*\w)")
# Files the reader writes as they follow the walkthrough, not files the project ships.
WRITTEN_BY_THE_READER = {"policies/enforce.yaml"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_project_path_a_document_names_exists(doc: str) -> None:
    text = (ROOT / doc).read_text()
    named = set(PATH.findall(text)) - WRITTEN_BY_THE_READER
    assert named, f"{doc} names no project path: the pattern is broken"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_the_readmes_walked_through_policy_passes_check(tmp_path: Path) -> None:
    """A reader pastes it first; it once named a kind (refund.issue) no action of it yields."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A policy, walked through", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "walked.yaml"
    path.write_text(block)
    policy = load_policy(str(path))
    assert {"llm", "crm.read", "refund.issue"} <= {a.kind for a in policy.actions}


def test_the_readmes_metrics_are_the_ones_the_proxy_exposes() -> None:
    """The metrics table and the alert rules a reader copies name series the proxy has."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Metrics\n", 1)[1].split("\n### ", 1)[0]
    # (not `drawdown_metrics=false`, the option)
    named = set(re.findall(r"\b(drawdown_[a-z_]+)\b(?!=)", section))
    assert len(named) >= 8, named
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["", "_bucket", "_count", "_sum"],
    }
    exposed = {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in suffixes[family.type]
    }
    assert named <= exposed, sorted(named - exposed)
    rules = section.split("# Prometheus rules\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(rules)["groups"][0]["rules"], "the rules block no longer parses"
