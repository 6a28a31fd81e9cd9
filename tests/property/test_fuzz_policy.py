"""Fuzzing the policy loader: whatever a user writes, `load_policy` either succeeds or raises
PolicyInvalid whose every problem renders as one `FILE:LINE: message` line naming a real line
of that file — never another exception, never a traceback from `drawdown check`.

Three sources of input: random text; random YAML documents built from the real schema's keys
with values of the wrong types and shapes; and mutations (line edits, value swaps, byte
damage) of the shipped policies/*.yaml files.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from drawdown import cli
from drawdown.policy import PolicyInvalid, load_policy
from drawdown.policy import schema as policy_schema
from drawdown.policy.match import LEVELS, OPERATORS
from drawdown.policy.model import DETECTORS, MODES, RECORD_BODIES, UNITS, WINDOWS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "policies").rglob("*.yaml"))
# Read once: examples must not change if someone edits a policy while the suite runs.
SHIPPED_TEXT = {path.name: path.read_text() for path in SHIPPED}
# Example counts keep this file near 30 s on a busy 2-core machine; the total is reported in
# docs/guarantees.md; raise them locally when hunting.
EXAMPLES = {"text": 300, "documents": 120, "folders": 50, "mutations": 200}


def fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# Every name the schema knows, so random documents reach deep into the validator.
SCHEMA_KEYS = sorted(
    {
        *policy_schema.TOP_LEVEL,
        *policy_schema.ACTION_KEYS,
        *policy_schema.MATCH_KEYS,
        *policy_schema.BUDGET_KEYS,
        *policy_schema.RULE_KEYS,
        *policy_schema.METER_KEYS,
        *policy_schema.SOURCE_KINDS,
        *LEVELS,
        *OPERATORS,
        *DETECTORS,
        "default",
        "rules",
        "ttl",
        "lease",
        "bodies",
        "fields",
        "max_body_bytes",
        "on_detect",
        "same",
        "input",
        "output",
        "cache_read",
        "cache_write",
        "repeats",
        "ratio",
        "max",
        "limits",
        "max_request_bytes",
    }
)
WORDS = sorted(
    {
        *MODES,
        *WINDOWS,
        *UNITS,
        *RECORD_BODIES,
        *policy_schema.PROVIDERS,
        "allow",
        "deny",
        "passthrough",
        "flag",
        "llm",
        "crm.read",
        "refund.*",
        "*",
        "**",
        "agent:*",
        "agent:*/run:*",
        "tenant:acme/agent:x",
        "agent:",
        "run:a/run:b",
        "nolevel:x",
        "api.openai.com",
        "host:99999",
        "[::1]:8080",
        "/v1/**",
        "/api/customers/{id}",
        "/{id}/{id}",
        "/{1bad}",
        "no-slash",
        "json.amount",
        "path.id",
        "header.x-y",
        "model",
        "X-Drawdown-Agent",
        "bad header",
        "[unclosed",
        "[]",
        "(unclosed regex",
        "gpt-4o-mini",
        "",
        " ",
        "~",
        "\t",
        "\u00e9\u00e8",
        "\u202e",
        "NaN",
        ".inf",
        "-1",
        "1e400",
        "0.000000000001",
    }
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.sampled_from([0, 1, -1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(SCHEMA_KEYS), st.sampled_from(SCHEMA_KEYS), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=12,
)


def _section(key_pool: tuple[str, ...] | list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping whose keys mostly come from one part of the schema, values of any type."""
    return st.dictionaries(
        st.one_of(st.sampled_from(list(key_pool)), keys), values, min_size=1, max_size=6
    )


matches = _section(policy_schema.MATCH_KEYS)
actions = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "kind": st.one_of(st.sampled_from(WORDS), scalars),
                "match": st.one_of(matches, values),
            },
            optional={k: values for k in policy_schema.ACTION_KEYS if k not in ("kind", "match")},
        ),
        values,
    ),
    max_size=4,
)
budgets = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"scope": st.one_of(st.sampled_from(WORDS), scalars)},
            optional={
                k: st.one_of(scalars, values) for k in policy_schema.BUDGET_KEYS if k != "scope"
            },
        ),
        values,
    ),
    max_size=4,
)
rules = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"scope": st.one_of(st.sampled_from(WORDS), scalars)},
            optional={
                "allow": values,
                "deny": values,
                "action": scalars,
                "when": st.one_of(
                    st.dictionaries(
                        st.sampled_from(["json", "model", "query", "header", "path", "json.a"]),
                        values,
                        max_size=3,
                    ),
                    values,
                ),
                "requires": values,
                "mode": scalars,
                "name": scalars,
            },
        ),
        values,
    ),
    max_size=4,
)
identity = st.dictionaries(
    st.one_of(st.sampled_from(LEVELS), keys),
    st.one_of(
        st.lists(
            st.dictionaries(
                st.sampled_from(policy_schema.SOURCE_KINDS), scalars, min_size=1, max_size=2
            ),
            max_size=3,
        ),
        values,
    ),
    max_size=4,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "version": scalars,
        "mode": st.one_of(st.sampled_from(MODES), scalars),
        "unknown_hosts": scalars,
        "on_ledger_error": scalars,
        "identity": st.one_of(identity, values),
        "actions": st.one_of(actions, values),
        "budgets": st.one_of(budgets, values),
        "authority": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"default": scalars, "rules": st.one_of(rules, values)}
            ),
            values,
        ),
        "anomalies": st.one_of(
            st.dictionaries(
                st.sampled_from(list(DETECTORS)),
                st.one_of(
                    _section(("on_detect", "actions", "repeats", "ratio", "max", "latency_ms")),
                    values,
                ),
                max_size=3,
            ),
            values,
        ),
        "meter": st.one_of(_section(policy_schema.METER_KEYS), values),
        "holds": st.one_of(_section(("ttl", "lease")), values),
        "record": st.one_of(_section(("bodies", "fields", "max_body_bytes")), values),
        "limits": st.one_of(_section(("max_request_bytes",)), values),
    },
)


# Text made of YAML's own punctuation and a few policy words: reaches the parser's corners
# (anchors, tags, flow collections, block scalars, directives) far more often than random text.
yamlish = st.lists(
    st.sampled_from(
        [
            ":",
            ": ",
            "- ",
            "-",
            "{",
            "}",
            "[",
            "]",
            ",",
            "#",
            "&a",
            "*a",
            "!",
            "!!str",
            "!!int",
            "|",
            ">",
            "'",
            '"',
            "%YAML 1.2",
            "---",
            "...",
            "? ",
            "=",
            "<<: ",
            "\n",
            "\n  ",
            "\t",
            " ",
            "~",
            "@",
            "`",
            "budgets",
            "actions",
            "scope",
            "usd",
            "agent:*",
            "mode",
            "1",
            "-1",
            "0.5",
            "true",
            "null",
        ]
    ),
    max_size=60,
).map("".join)


def _dump(document: Any, flow: bool) -> str:
    return yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True, sort_keys=False)


# --- the oracle ---------------------------------------------------------------------------

_RENDERED = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<message>\S.*)$")


def _line_count(path: Path) -> int:
    try:
        return max(1, path.read_bytes().count(b"\n") + 1)
    except OSError:
        return 1


def assert_loads_or_explains(path: Path) -> None:
    """The property: success, or PolicyInvalid with well-placed one-line problems."""
    try:
        load_policy(path)
    except PolicyInvalid as exc:
        assert exc.problems, "PolicyInvalid without a problem"
        files = {str(p) for p in ([path] if path.is_file() else path.iterdir())}
        for problem in exc.problems:
            text = str(problem)
            assert text.isprintable(), (
                f"a problem holds line breaks or control characters: {text!r}"
            )
            found = _RENDERED.match(text)
            assert found, f"not FILE:LINE: message: {text!r}"
            assert problem.file in files, f"problem names a file that is not the policy's: {text!r}"
            assert 1 <= problem.line <= _line_count(Path(problem.file)) + 1, (
                f"line {problem.line} is not a line of {problem.file}: {text!r}"
            )


def assert_check_prints_no_traceback(path: Path) -> None:
    """`drawdown check` (in process): exit 0 or 1 and never an exception."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(["check", str(path)])
    assert status in (0, 1)
    assert "Traceback" not in out.getvalue()


@contextlib.contextmanager
def policy_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-policy-") as name:
        yield Path(name)


# A sample of the generated files, checked by a real `drawdown check` process at the end.
_CORPUS = Path(tempfile.mkdtemp(prefix="fuzz-policy-corpus-"))
_corpus_count = 0


def _keep(text: str | bytes) -> None:
    global _corpus_count
    _corpus_count += 1
    if _corpus_count % 5 == 0:
        target = _CORPUS / f"p{_corpus_count:05d}.yaml"
        target.write_bytes(
            text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        )


def _write(directory: Path, text: str | bytes, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    _keep(text)
    return path


# --- properties -----------------------------------------------------------------------------


@fuzz(EXAMPLES["text"])
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=200), yamlish))
def test_random_text_is_loaded_or_explained(text: str | bytes) -> None:
    with policy_dir() as directory:
        path = _write(directory, text)
        assert_loads_or_explains(path)
        assert_check_prints_no_traceback(path)


@fuzz(EXAMPLES["documents"])
@given(document=documents, flow=st.booleans())
def test_schema_shaped_documents_with_wrong_types_are_loaded_or_explained(
    document: dict[str, Any], flow: bool
) -> None:
    with policy_dir() as directory:
        path = _write(directory, _dump(document, flow))
        assert_loads_or_explains(path)
        assert_check_prints_no_traceback(path)


@fuzz(EXAMPLES["folders"])
@given(first=documents, second=documents)
def test_policy_folders_merge_or_explain(first: dict[str, Any], second: dict[str, Any]) -> None:
    """A folder of files: settings made twice, budgets defined twice, problems in either file."""
    with policy_dir() as directory:
        _write(directory, _dump(first, False), "a.yaml")
        _write(directory, _dump(second, True), "b.yaml")
        assert_loads_or_explains(directory)


def _mutate(text: str, data: st.DataObject) -> str:
    lines = text.split("\n")
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if not lines:
            lines = [""]
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        how = data.draw(
            st.sampled_from(
                ["delete", "duplicate", "swap", "value", "indent", "insert", "truncate", "key"]
            ),
            label="how",
        )
        line = lines[i]
        if how == "delete":
            del lines[i]
        elif how == "duplicate":
            lines.insert(i, line)
        elif how == "swap":
            j = data.draw(st.integers(0, len(lines) - 1), label="other line")
            lines[i], lines[j] = lines[j], lines[i]
        elif how == "value" and ":" in line:
            # Replace what follows a colon with another scalar, quoted or not.
            head, _, _ = line.rpartition(":")
            new = data.draw(scalars, label="new value")
            lines[i] = (
                f"{head}: {yaml.safe_dump(new, default_flow_style=True).strip().removesuffix('...').strip()}"
            )
        elif how == "indent":
            lines[i] = (
                data.draw(st.sampled_from(["", " ", "  ", "    ", "\t"]), label="indent")
                + line.lstrip()
            )
        elif how == "insert":
            pos = data.draw(st.integers(0, len(line)), label="column")
            lines[i] = line[:pos] + data.draw(st.text(max_size=3), label="inserted") + line[pos:]
        elif how == "truncate":
            lines = lines[: i + 1]
            lines[i] = line[: data.draw(st.integers(0, len(line)), label="cut")]
        elif how == "key" and ":" in line:
            _, _, rest = line.partition(":")
            indent = line[: len(line) - len(line.lstrip())]
            key = data.draw(st.sampled_from(SCHEMA_KEYS), label="key")
            lines[i] = f"{indent}{'- ' if line.lstrip().startswith('- ') else ''}{key}:{rest}"
    return "\n".join(lines)


@fuzz(EXAMPLES["mutations"])
@given(source=st.sampled_from(sorted(SHIPPED_TEXT)), data=st.data())
def test_mutated_shipped_policies_are_loaded_or_explained(source: str, data: st.DataObject) -> None:
    text = _mutate(SHIPPED_TEXT[source], data)
    with policy_dir() as directory:
        path = _write(directory, text)
        assert_loads_or_explains(path)
        assert_check_prints_no_traceback(path)


def test_shipped_policies_are_valid() -> None:
    assert SHIPPED
    for path in SHIPPED:
        load_policy(path)


@pytest.mark.parametrize("bound", [".nan", "NaN", "sNaN"])
def test_a_nan_bound_is_a_policy_error(tmp_path: Path, bound: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"actions:\n  - kind: t\n    match: {{json: {{amount: {{gt: {bound}}}}}}}\n")
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}:3: ")


def test_drawdown_check_process_prints_no_traceback_over_the_corpus() -> None:
    """A real `drawdown check` process over a sample of everything generated above (runs last)."""
    files = sorted(_CORPUS.glob("*.yaml"))
    if len(files) < 10:  # run alone: make a few of our own
        for i, source in enumerate(SHIPPED):
            (_CORPUS / f"s{i}.yaml").write_text(source.read_text().replace(":", ": [", 3))
        files = sorted(_CORPUS.glob("*.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "drawdown", "check", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (0, 1)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    for line in result.stdout.splitlines():
        assert _RENDERED.match(line) or ": ok — " in line, f"not FILE:LINE: message: {line!r}"


def test_the_request_size_limit_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("limits: {max_request_bytes: 2048}\n")
    assert load_policy(path).limits.max_request_bytes == 2048
    path.write_text("limits:\n  max_request_bytes: 0\n  max_body: 5\n")
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:2: limits.max_request_bytes must be a whole number ≥ 1, not 0",
        f"{path}:3: unknown key 'max_body' in limits (expected one of: max_request_bytes)",
    ]
