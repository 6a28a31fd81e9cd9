"""Policy loading: every problem is reported as FILE:LINE: message, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from drawdown.policy import PolicyInvalid, load_policy, source

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(write(tmp_path, text))
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("name", ["default.yaml", "example.yaml"])
def test_shipped_policies_are_valid(name: str) -> None:
    policy = load_policy(ROOT / "policies" / name)
    assert policy.actions and policy.budgets


def test_default_policy_is_shadow_mode() -> None:
    assert load_policy(ROOT / "policies" / "default.yaml").mode == "shadow"


def test_compiles_budgets_exactly(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """
budgets:
  - {scope: "agent:*/run:*", usd: 0.10, tokens: 5000, requests: 3}
  - {scope: "tenant:*", per: day, usd: 100}
  - {name: refunds, scope: "agent:support-*/run:*", actions: [refund.*], requests: 3, mode: shadow}
""",
        )
    )
    run, tenant, refunds = policy.budgets
    # Money is exact: 0.10 USD is 100,000,000 nano-dollars, not a float approximation.
    assert run.limits.usd_nanos == 100_000_000
    assert (run.limits.tokens, run.limits.requests, run.per) == (5000, 3, None)
    assert tenant.per == "day" and tenant.limits.usd_nanos == 100 * 10**9
    assert refunds.key == "refunds" and refunds.mode == "shadow"
    assert refunds.covers_action("refund.issue") and not refunds.covers_action("crm.read")
    assert run.key == "agent:*/run:*" and tenant.key == "tenant:* per day"


def test_unknown_keys_wrong_types_and_bad_values_have_lines(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """mode: enforcee
identity:
  agent: [{headr: X}]
actions:
  - {kind: llm, provider: openia, match: {host: api.openai.com}}
  - {kind: x, match: {path: "v1/x"}}
  - {kind: y, match: {json: {amount: {gtt: 5}}}}
  - {kind: z, match: {json: {name: {regex: "("}}}}
budgets:
  - {scope: "agnt:*", usd: 1}
  - {scope: "agent:*", per: week, usd: -1}
  - {scope: "agent:*", usdd: 3}
  - {scope: "agent:*", tokens: 1.5}
  - {scope: "agent:*", usd: 0.0000000001}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert (
        f"{f}:1: mode must be one of enforce, shadow, not 'enforcee' (did you mean 'enforce'?)"
        in found
    )
    assert any(
        p.startswith(f"{f}:3: unknown key 'headr'") and "did you mean 'header'" in p for p in found
    )
    assert any(p.startswith(f"{f}:5: provider must be one of") for p in found)
    assert f"{f}:6: path pattern 'v1/x' must start with '/'" in found
    assert any(
        p.startswith(f"{f}:7: condition on 'json.amount': unknown operator 'gtt'") for p in found
    )
    assert any(p.startswith(f"{f}:8: condition on 'json.name': invalid regex") for p in found)
    assert any(p.startswith(f"{f}:10: unknown scope level 'agnt'") for p in found)
    assert any(p.startswith(f"{f}:11: per must be one of") for p in found)
    assert any(p.startswith(f"{f}:11: usd must be a number") for p in found)
    assert any(p.startswith(f"{f}:12: unknown key 'usdd'") for p in found)
    assert f"{f}:13: tokens must be a whole number ≥ 0, not 1.5" in found
    assert any(p.startswith(f"{f}:14: usd:") and "nano-dollar" in p for p in found)


def test_amounts_past_the_ledgers_range_are_refused(tmp_path: Path) -> None:
    """The ledger keeps 64-bit integers: a limit, cost or price it cannot hold would pass
    `check` and then fail every request at run time as ledger_unavailable."""
    found = problems(
        tmp_path,
        """actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}, price: {input: 2e9, output: 1}}
  - {kind: crm.read, match: {host: crm.example.com}, cost: {usd: 1e30}}
budgets:
  - {scope: "agent:*", usd: 1000000001}
  - {scope: "agent:*", tokens: 1000000000000000001, requests: 1e400}
  - {scope: "tenant:*", usd: 1000000000, tokens: 1000000000000000000}
meter: {default_max_output_tokens: 99999999999999999999}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert (
        f"{f}:2: price.input (USD per million tokens) must be at most 1,000,000,000, not 2E+9"
        in found
    )
    assert f"{f}:3: cost.usd must be at most 1,000,000,000, not 1E+30" in found
    assert f"{f}:5: usd must be at most 1,000,000,000, not 1000000001" in found
    assert f"{f}:6: tokens must be at most 10^18, not 1000000000000000001" in found
    assert f"{f}:6: requests must be a whole number ≥ 0, not 1E+400" in found
    assert (
        f"{f}:8: default_max_output_tokens must be at most 10^18, not 99999999999999999999" in found
    )
    assert not [p for p in found if p.startswith(f"{f}:7:")]  # the bound itself is allowed


def test_a_fallback_price_of_zero_is_refused(tmp_path: Path) -> None:
    """The README promises an unknown model is never charged at $0; an action's own price may
    be 0 (a free local model)."""
    found = problems(
        tmp_path,
        """actions:
  - {kind: llm, provider: openai, match: {host: vllm.internal}, price: {input: 0, output: 0}}
meter:
  fallback_price: {input: 15, output: 0}
""",
    )
    assert found == [f"{tmp_path / 'policy.yaml'}:4: fallback_price.output must be above 0, not 0"]


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    found = problems(tmp_path, "budgets:\n  - {scope: 'a:*', usd: 1\n")
    assert (
        len(found) == 1
        and found[0].startswith(f"{tmp_path / 'policy.yaml'}:")
        and "YAML syntax error" in found[0]
    )


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    found = problems(tmp_path, "mode: shadow\nmode: enforce\n")
    assert found == [f"{tmp_path / 'policy.yaml'}:2: duplicate key 'mode' (first at line 1)"]


def test_not_a_mapping_and_non_utf8(tmp_path: Path) -> None:
    assert problems(tmp_path, "- just\n- a list\n")[0].endswith(
        "a policy file must be a mapping of sections"
    )
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"mode: \xe9\n")
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(bad)
    assert "not UTF-8" in str(caught.value)


def test_a_byte_that_is_not_utf8_is_reported_at_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"mode: enforce\n# caf\xe9\n")
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(bad)
    assert str(caught.value).startswith(f"{bad}:2: not UTF-8 text")


def test_a_policy_file_in_a_folder_that_cannot_be_read_is_reported_not_skipped(
    tmp_path: Path,
) -> None:
    """A broken link or a folder named like a policy file was skipped without a word: the
    budgets it was meant to hold silently disappeared, and a hot reload installed the rest."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "actions.yaml").write_text("mode: enforce\n")
    (folder / "budgets.yaml").symlink_to(tmp_path / "moved-away.yaml")
    (folder / "limits.yml").mkdir()
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(folder)
    assert str(caught.value).splitlines() == [
        f"{folder / 'budgets.yaml'}:0: cannot read: a link to nothing",
        f"{folder / 'limits.yml'}:0: cannot read: Is a directory",
    ]


def test_a_policy_folder_that_cannot_be_listed_is_a_policy_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a PermissionError traceback (in every command) nor a dead hot-reload watcher."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "a.yaml").write_text("mode: enforce\n")

    def unlistable(self: Path) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", unlistable)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(folder)
    assert str(caught.value) == f"{folder}:0: cannot read: Permission denied"


def test_a_policy_in_a_folder_that_cannot_be_searched_is_a_policy_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent folder without search permission makes even `exists()` raise PermissionError:
    that was a traceback out of every command, before the folder or file was ever listed."""
    policy = write(tmp_path, "mode: enforce\n")
    real_stat = Path.stat

    def unsearchable(self: Path, **kwargs: bool) -> os.stat_result:
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", unsearchable)
    monkeypatch.setattr(Path, "lstat", unsearchable)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(policy)
    assert str(caught.value) == f"{policy}:0: cannot read: Permission denied"


def test_a_policy_path_that_is_a_broken_or_looping_link_says_so(tmp_path: Path) -> None:
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "moved-away.yaml")
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    for name, expected in (
        ("dangling.yaml", "a link to nothing"),
        ("loop.yaml", "cannot read: Too many levels of symbolic links"),
    ):
        with pytest.raises(PolicyInvalid) as caught:
            load_policy(tmp_path / name)
        assert str(caught.value) == f"{tmp_path / name}:0: {expected}"


def test_yaml_nested_thousands_deep_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    found = problems(tmp_path, "mode: " + "[" * 5000 + "]" * 5000 + "\n")
    assert found == [f"{tmp_path / 'policy.yaml'}:1: nested more than 64 levels deep"]
    deep = "".join("  " * level + f"k{level}:\n" for level in range(80))
    found = problems(tmp_path, "extra:\n" + "".join("  " + line for line in deep.splitlines(True)))
    assert found == [f"{tmp_path / 'policy.yaml'}:65: nested more than 64 levels deep"]


def test_yaml_nested_thousands_deep_is_reported_at_the_line_that_goes_too_deep(
    tmp_path: Path,
) -> None:
    """3,000 levels overflowed PyYAML's recursive composer: the RecursionError was caught, but
    reported at line 1, wherever the nesting was."""
    levels = 3000
    deep = "".join("  " * (level + 1) + f"k{level}:\n" for level in range(levels))
    found = problems(tmp_path, "mode: enforce\nextra:\n" + deep)
    # `extra` is level 1 and k0 on line 3 level 2: level 65, the first too deep, is on line 66.
    assert found == [f"{tmp_path / 'policy.yaml'}:66: nested more than 64 levels deep"]


def test_yaml_aliases_that_multiply_are_refused_before_they_expand(tmp_path: Path) -> None:
    """Nine levels of nine aliases ("billion laughs") is 387 million values: expanded, it ate
    the memory of `drawdown check`, a reload or the proxy's start. A policy never needs 100k."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 9)]
    found = problems(tmp_path, "\n".join(lines) + "\n")
    assert len(found) == 1
    assert found[0].endswith(
        ": the policy holds more than 100,000 values once its YAML aliases (*name) are expanded"
    )


def test_a_policy_too_big_without_aliases_is_not_blamed_on_aliases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "MAX_VALUES", 50)  # the bound, not 100,000 values parsed
    found = problems(tmp_path, "mode: enforce\nx-many: [" + ", ".join(["1"] * 60) + "]\n")
    assert found == [f"{tmp_path / 'policy.yaml'}:2: the policy holds more than 50 values"]


def test_yaml_1_1_surprises_are_not_applied(tmp_path: Path) -> None:
    # `yes` stays text (not true), so a typo'd boolean is reported instead of silently accepted.
    found = problems(tmp_path, "identity:\n  agent: [{proxy_user: yes}]\n")
    assert found == [f"{tmp_path / 'policy.yaml'}:2: proxy_user takes true"]


def test_folder_policies_merge_and_conflicts_are_reported(tmp_path: Path) -> None:
    write(
        tmp_path,
        "mode: enforce\nactions:\n  - {kind: llm, provider: openai, match: {host: api.openai.com}}\n",
        "10-base.yaml",
    )
    write(tmp_path, "budgets:\n  - {scope: 'agent:*/run:*', usd: 1}\n", "20-budgets.yaml")
    policy = load_policy(tmp_path)
    assert len(policy.actions) == 1 and len(policy.budgets) == 1 and len(policy.files) == 2
    write(
        tmp_path, "mode: shadow\nbudgets:\n  - {scope: 'agent:*/run:*', usd: 2}\n", "30-more.yaml"
    )
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(tmp_path)
    text = str(caught.value)
    assert (
        f"{tmp_path / '30-more.yaml'}:1: 'mode' is already set at {tmp_path / '10-base.yaml'}:1"
        in text
    )
    assert "budget 'agent:*/run:*' is defined twice" in text


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid, match="no such file"):
        load_policy(tmp_path / "nope.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyInvalid, match=r"no \*\.yaml policy files"):
        load_policy(empty)


def test_identity_defaults_and_overrides(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "identity:\n  agent: [{header: X-Agent}]\n"))
    assert [s.kind for s in policy.identity["agent"]] == ["header"]
    assert [s.kind for s in policy.identity["run"]] == ["header", "proxy_password", "idle_split"]
    assert policy.uses_proxy_auth  # the default run level still reads the proxy password
    plain = load_policy(
        write(
            tmp_path,
            "identity:\n  agent: [{header: X-Agent}]\n  run: [{header: X-Run}]\n",
            "p2.yaml",
        )
    )
    assert not plain.uses_proxy_auth


def test_an_empty_file_is_refused_not_taken_for_a_policy_without_budgets(tmp_path: Path) -> None:
    """An editor that saves in place truncates the file first; a reload in that moment must
    keep the last good policy, not enforce nothing."""
    for text in ("", "\n\n", "# version: 1\n# mode: enforce\n"):
        assert problems(tmp_path, text) == [
            f"{tmp_path / 'policy.yaml'}:1: the file holds no policy (empty, or only comments)"
        ]
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder, "version: 1\nmode: enforce\n", "a.yaml")
    write(folder, "", "b.yaml")
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(folder)
    assert [str(p) for p in caught.value.problems] == [
        f"{folder / 'b.yaml'}:1: the file holds no policy (empty, or only comments)"
    ]


def test_hidden_files_in_a_policy_folder_are_not_read(tmp_path: Path) -> None:
    write(tmp_path, "version: 1\nmode: enforce\n", "policy.yaml")
    write(tmp_path, "version: 1\nmode: shadow\n", ".policy.yaml")  # an editor's copy
    assert load_policy(tmp_path).mode == "enforce"


# A kind named where no action yields it never matches: `deny: [refund.isue]` would deny nothing.
KIND_ACTIONS = """actions:
  - {kind: refund.issue, match: {host: api.stripe.com}}
  - {kind: crm.read, match: {host: crm.example.com}}
"""


def test_a_misspelled_action_kind_is_reported_where_it_is_named(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        KIND_ACTIONS
        + """authority:
  rules:
    - {scope: "agent:intern", deny: [refund.isue]}
    - {scope: "agent:lead", allow: [crm.read, refund.isseu]}
    - scope: "*"
      action: refnd.issue
      requires:
        - {action: crm.raed}
        - crm.red
budgets:
  - scope: "agent:*/run:*"
    actions:
      - refund.issue
      - refund.isue
    requests: 3
anomalies:
  loop: {actions: [crm.rea]}
  under_commit: {actions: [nothing.like.it]}
""",
    )
    f = tmp_path / "policy.yaml"
    hint = "names no action kind of this policy (did you mean"
    assert found == [
        f"{f}:6: 'refund.isue' {hint} 'refund.issue'?)",
        f"{f}:7: 'refund.isseu' {hint} 'refund.issue'?)",
        f"{f}:9: 'refnd.issue' {hint} 'refund.issue'?)",
        f"{f}:11: 'crm.raed' {hint} 'crm.read'?)",
        f"{f}:12: 'crm.red' {hint} 'crm.read'?)",
        f"{f}:17: 'refund.isue' {hint} 'refund.issue'?)",
        f"{f}:20: 'crm.rea' {hint} 'crm.read'?)",
        f"{f}:21: 'nothing.like.it' names no action kind of this policy"
        " (its kinds: crm.read, refund.issue)",
    ]


def test_a_glob_that_matches_no_kind_is_reported(tmp_path: Path) -> None:
    found = problems(
        tmp_path, KIND_ACTIONS + 'budgets:\n  - {scope: "agent:*", actions: [refnd.*], usd: 1}\n'
    )
    assert found == [
        f"{tmp_path / 'policy.yaml'}:5: 'refnd.*' matches no action kind of this policy"
        " (its kinds: crm.read, refund.issue)"
    ]


def test_kinds_defined_in_another_file_of_a_folder_are_known(tmp_path: Path) -> None:
    write(tmp_path, KIND_ACTIONS, "10-actions.yaml")
    write(
        tmp_path,
        'authority:\n  rules:\n    - {scope: "agent:intern", deny: [refund.issue, refund.isue]}\n',
        "20-rules.yaml",
    )
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / '20-rules.yaml'}:3: 'refund.isue' names no action kind of this policy"
        " (did you mean 'refund.issue'?)"
    ]


def test_mcp_tool_kinds_and_globs_are_known(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            KIND_ACTIONS
            + """  - kind: mcp.docs
    provider: mcp
    match: {host: mcp.example.com}
    tools: {"search*": docs.search}
authority:
  rules:
    - {scope: "*", deny: [mcp.docs, mcp.docs.delete_page, docs.search, "mcp.docs.update_*"]}
    - {scope: "*", allow: ["*", "refund.*", "crm.rea?", "mcp.*", "*.delete"]}
budgets:
  - {scope: "agent:*", actions: [mcp.docs.search_docs], requests: 5}
""",
        )
    )
    assert len(policy.authority.rules) == 2 and len(policy.budgets) == 1


def test_a_policy_without_actions_names_kinds_freely(tmp_path: Path) -> None:
    # Nothing is classified, so there is nothing to check against: e.g. anomaly settings
    # alone, for `drawdown report --policy` over a ledger another policy wrote.
    policy = load_policy(write(tmp_path, "anomalies:\n  under_commit: {actions: [llm]}\n"))
    assert policy.anomalies.get("under_commit").actions == ("llm",)


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(ROOT) for p in (ROOT / "policies").rglob("*.yaml"))
)
def test_every_shipped_policy_names_only_kinds_it_defines(path: Path) -> None:
    assert load_policy(ROOT / path).actions


def test_exponent_numbers_are_numbers_as_in_yaml_1_2(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-3 (no dot) and 2.5e3 (no sign) as text; 1.2 and its users do not."""
    text = "budgets:\n  - {scope: 'agent:*', usd: %s, requests: 1}\n"
    for written, nanos in (("1e-3", 10**6), ("2.5e3", 2500 * 10**9), ("1E+2", 100 * 10**9)):
        (budget,) = load_policy(write(tmp_path, text % written)).budgets
        assert budget.limits.usd_nanos == nanos, written
    assert problems(tmp_path, text % "'1e-3'") == [
        f"{tmp_path / 'policy.yaml'}:2: usd must be a number ≥ 0, not '1e-3'"
    ]  # quoted, it is text: still refused


PATH_FIELDS = """
actions:
  - {kind: crm.read, match: {host: crm.example.com, method: GET, path: "/api/customers/{cid}"}}
  - {kind: crm.write, match: {host: crm.example.com, method: PUT, path: "/api/customers/{id}"}}
  - {kind: refund.issue, match: {host: api.stripe.com, method: POST, path: /v1/refunds}}
  - {kind: mcp.docs, provider: mcp, match: {host: mcp.example.com, path: "/mcp/{space}"}}
authority:
  rules:
    - {scope: "*", action: refund.issue, requires: [{action: crm.read, same: {json.customer: path.id}}]}
    - {scope: "*", allow: [refund.issue], when: {path.amount: {eq: "7"}}}
    - {scope: "*", action: refund.issue, requires: [{action: "crm.*", same: {json.customer: path.id}}]}
    - {scope: "*", allow: [mcp.docs.search], when: {path: {space: {eq: public}}}}
    - {scope: "*", deny: [crm.read], when: {path.cid: {eq: "0"}}}
"""


def test_a_path_field_no_action_captures_is_refused(tmp_path: Path) -> None:
    """`same: {json.customer: path.id}` beside `/api/customers/{cid}` passed `check`, and then
    no refund could ever meet its requirement. A capture some of the actions have (crm.*) or
    an MCP tool's action has passes."""
    f = tmp_path / "policy.yaml"
    assert problems(tmp_path, PATH_FIELDS) == [
        f"{f}:9: 'path.id' is captured by no action it applies to "
        "(crm.read: /api/customers/{cid}): name a {id} segment in the action's path pattern",
        f"{f}:10: 'path.amount' is captured by no action it applies to "
        "(refund.issue: /v1/refunds): name a {amount} segment in the action's path pattern",
    ]


def test_a_rule_name_is_used_once(tmp_path: Path) -> None:
    """Reports and denials name the rule: two of one name cannot be told apart."""
    f = tmp_path / "policy.yaml"
    text = """
actions:
  - {kind: crm.read, match: {host: crm.example.com}}
authority:
  rules:
    - {name: reads, scope: "agent:a", allow: [crm.read]}
    - {name: reads, scope: "agent:b", deny: [crm.read]}
"""
    assert problems(tmp_path, text) == [f"{f}:7: rule name 'reads' is already used at {f}:6"]


def test_cost_json_is_a_path_to_one_value(tmp_path: Path) -> None:
    """`usage..cost` passed check and read a key named "": every call was charged its fixed
    cost, with a warning, whatever the tool reported."""
    f = tmp_path / "policy.yaml"
    text = """
actions:
  - {kind: a, match: {host: a.example.com}, cost: {usd: 0.01}, cost_json: "usage..cost"}
  - {kind: b, match: {host: b.example.com}, cost: {usd: 0.01}, cost_json: "usage.cost."}
  - {kind: c, match: {host: c.example.com}, cost: {usd: 0.01}, cost_json: "items.*.cost"}
  - {kind: d, match: {host: d.example.com}, cost: {usd: 0.01}, cost_json: "items.0.cost"}
"""
    assert problems(tmp_path, text) == [
        f"{f}:{line}: cost_json '{path}' must be a dotted path to one value, such as usage.cost_usd"
        for line, path in ((3, "usage..cost"), (4, "usage.cost."), (5, "items.*.cost"))
    ]


def test_a_rule_with_a_refused_when_gets_only_that_error(tmp_path: Path) -> None:
    """An invalid regex was followed by "a rule with 'action:' needs 'requires:' or 'when:'",
    although the rule had a `when:`: the second error was wrong, and hid which one to fix."""
    head = """actions:
  - {kind: crm.write, match: {host: crm.example, method: POST}}
authority:
  rules:
    - scope: "agent:*"
      action: crm.write
"""
    f = tmp_path / "policy.yaml"
    for rule, expected in (
        (
            '      when: {json.name: {regex: "([a-z"}}\n',
            f"{f}:7: condition on 'json.name': invalid regex '([a-z': missing ]: [a-z",
        ),
        ("      when: oops\n", f"{f}:7: when must be a mapping, not text 'oops'"),
        (
            "      requires: [5]\n",
            f"{f}:7: a requirement is an action kind or {{action: KIND, same: FIELD}}",
        ),
        (
            "      when: {}\n",  # given but empty: said at the `when`, as on allow/deny rules
            f"{f}:7: when: {{}} holds no condition: give one, or leave 'when' out",
        ),
    ):
        assert problems(tmp_path, head + rule) == [expected], rule


def test_values_are_shown_as_yaml_spells_them(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "mode: ~\nunknown_hosts: true\nbudgets:\n  - {scope: 'agent:*', usd: null}\n",
    )
    f = tmp_path / "policy.yaml"
    assert found == [
        f"{f}:1: mode must be one of enforce, shadow, not null",
        f"{f}:2: unknown_hosts must be one of allow, deny, passthrough, not true",
        f"{f}:4: usd must be a number ≥ 0, not null",
    ]


def test_a_whole_number_written_as_a_float_says_how_to_write_it(tmp_path: Path) -> None:
    """`usd: 1e9` is money, any number; `tokens: 1e18` is a count, an integer, and YAML reads
    1e18 as a float: refused, but the bare "must be a whole number, not 1E+18" read as a
    contradiction."""
    found = problems(
        tmp_path, "budgets:\n  - {scope: 'agent:*', usd: 1e9, tokens: 1e18, requests: 2.5}\n"
    )
    f = tmp_path / "policy.yaml"
    assert found == [
        f"{f}:2: tokens must be a whole number ≥ 0, not 1E+18"
        " (write it in digits, with no dot or exponent)",
        f"{f}:2: requests must be a whole number ≥ 0, not 2.5",
    ]


def test_loop_retries_is_a_count_from_zero(tmp_path: Path) -> None:
    """anomalies.loop.retries: the failed attempts per request the loop and step_count guards
    forgive (default 2, the SDKs' max_retries); 0 counts every attempt."""
    from drawdown.addon import guards_for

    text = "anomalies:\n  loop: {repeats: 3, on_detect: deny%s}\n  step_count: {on_detect: deny}\n"
    default = load_policy(write(tmp_path, text % ""))
    assert default.anomalies.get("loop").param("retries") == 2
    guards = guards_for(default, "llm")
    assert guards is not None and (guards.max_repeats, guards.retries) == (3, 2)
    none = load_policy(write(tmp_path, text % ", retries: 0"))
    assert (guards := guards_for(none, "llm")) is not None and guards.retries == 0
    # step_count alone denying: the loop detector's retries still apply to it.
    alone = load_policy(write(tmp_path, "anomalies:\n  step_count: {max: 4, on_detect: deny}\n"))
    assert (guards := guards_for(alone, "llm")) is not None
    assert (guards.max_repeats, guards.max_steps, guards.retries) == (None, 4, 2)
    f = tmp_path / "policy.yaml"
    assert problems(tmp_path, text % ", retries: -1") == [
        f"{f}:2: anomalies.loop.retries must be a whole number ≥ 0, not -1"
    ]
    assert problems(tmp_path, text % ", retries: two") == [
        f"{f}:2: anomalies.loop.retries must be a whole number ≥ 0, not 'two'"
    ]


def test_the_shipped_policies_meter_bedrock_in_every_region() -> None:
    """boto3's bedrock-runtime client and AnthropicBedrock call bedrock-runtime.REGION.amazonaws.com."""
    from drawdown.classify import RequestView, classify

    for name in ("default.yaml", "example.yaml"):
        policy = load_policy(ROOT / "policies" / name)
        for host in (
            "bedrock-runtime.us-east-1.amazonaws.com",
            "bedrock-runtime.eu-west-3.amazonaws.com",
        ):
            view = RequestView(
                "POST", host, 443, "/model/amazon.nova-pro-v1%3A0/converse", {}, {}, b"{}"
            )
            action = classify(policy, view).action
            assert action is not None and action.provider == "bedrock" and action.is_llm, (
                name,
                host,
            )


def test_a_bedrock_action_takes_a_price_but_no_cost(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            "actions:\n"
            "  - {kind: llm, provider: bedrock, match: {host: bedrock-runtime.us-east-1.amazonaws.com},"
            " price: {input: 1, output: 2}}\n",
        )
    )
    assert policy.actions[0].price is not None
    found = problems(
        tmp_path,
        "actions:\n  - {kind: llm, provider: bedrock, match: {host: x.example}, cost: {usd: 1}}\n",
    )
    assert any("priced from its tokens" in p for p in found), found


# --- edits that would silently disable enforcement ----------------------------------------


def test_an_action_after_a_catch_all_can_never_match(tmp_path: Path) -> None:
    """First match wins: behind `match: {}` the LLM action is never metered and the crm.write
    rule never applies. A catch-all last (the documented `other`) shadows nothing."""
    found = problems(
        tmp_path,
        """actions:
  - {kind: other0, match: {}}
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.write, match: {host: crm.example.com, method: POST}}
  - {kind: other, match: {}}
authority:
  rules:
    - {scope: "*", deny: [crm.write]}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert found == [
        f"{f}:{line}: action '{kind}' can never match: the action 'other0' at {f}:2 matches "
        "every request first (actions are tried in order: put the catch-all last)"
        for line, kind in ((3, "llm"), (4, "crm.write"), (5, "other"))
    ]
    policy = load_policy(
        write(
            tmp_path,
            "actions:\n  - {kind: llm, match: {host: a.example}}\n  - {kind: other, match: {}}\n",
        )
    )
    assert [a.kind for a in policy.actions] == ["llm", "other"]


def test_an_action_shadowed_from_an_earlier_file_of_a_folder_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "actions:\n  - {kind: other, match: {}}\n", "10-catch-all.yaml")
    write(
        tmp_path,
        "actions:\n  - {kind: crm.write, match: {host: crm.example.com, method: POST}}\n",
        "20-crm.yaml",
    )
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / '20-crm.yaml'}:2: action 'crm.write' can never match: the action 'other' "
        f"at {tmp_path / '10-catch-all.yaml'}:2 matches every request first (actions are tried "
        "in order: put the catch-all last; a folder's files are read in name order)"
    ]


@pytest.mark.parametrize(
    ("first", "later"),
    [
        ("{host: api.openai.com}", "{host: api.openai.com, path: /v1/chat/completions}"),
        ("{host: API.openai.com}", "{host: api.openai.com, method: POST, json: {stream: true}}"),
        ("{host: crm.example.com, method: [GET, POST]}", "{host: crm.example.com, method: get}"),
        ("{host: '*.example.com'}", "{host: [a.example.com, b.example.com:8443]}"),
        ("{host: '*'}", "{method: POST}"),
        ("{path: '/v1/**'}", "{host: x.example, path: /v1/refunds}"),
        ("{path: '/api/customers/{id}'}", "{path: '/api/customers/{cid}', method: GET}"),
        ("{path: '**'}", "{path: '/v1/*/items'}"),
        ("{host: 'localhost:8443'}", "{host: 'localhost:8443', path: /x}"),
        ("{host: [a.example, b.example]}", "{host: b.example, method: POST}"),
        ("{path: /v1/refunds}", "{path: /v1/refunds, method: POST, host: '*.stripe.com'}"),
    ],
)
def test_an_action_a_broader_earlier_one_always_takes_is_reported(
    tmp_path: Path, first: str, later: str
) -> None:
    found = problems(
        tmp_path, f"actions:\n  - {{kind: a, match: {first}}}\n  - {{kind: b, match: {later}}}\n"
    )
    f = str(tmp_path / "policy.yaml")
    assert found == [
        f"{f}:3: action 'b' can never match: the action 'a' at {f}:2 matches every request "
        "this one would, first (actions are tried in order: put the narrower action first)"
    ]


@pytest.mark.parametrize(
    ("first", "later"),
    [
        # The earlier one is narrower in some way, or only maybe broader: never an error.
        ("{host: api.openai.com, json: {stream: true}}", "{host: api.openai.com}"),
        ("{host: api.openai.com, query: {v: '1'}}", "{host: api.openai.com, query: {v: '1'}}"),
        ("{host: crm.example.com, method: GET}", "{host: crm.example.com}"),
        ("{host: crm.example.com, method: GET}", "{host: crm.example.com, method: [GET, POST]}"),
        ("{host: api.openai.com}", "{host: '*.openai.com'}"),
        ("{host: api.openai.com}", "{host: [api.openai.com, other.example]}"),
        ("{host: 'localhost:8443'}", "{host: localhost}"),
        ("{host: '*.example.com'}", "{}"),
        ("{path: /v1/refunds}", "{path: '/v1/**'}"),
        ("{path: '/v1/*'}", "{path: '/v1/**'}"),
        ("{path: '/v1/**'}", "{path: '/v1/*/x'}"),  # broader in fact, but not decided: no error
        ("{path: '/v1/**'}", "{}"),
        ("{host: api.openai.com}", "{path: /v1/x}"),
    ],
)
def test_actions_that_are_not_shadowed_are_accepted(tmp_path: Path, first: str, later: str) -> None:
    policy = load_policy(
        write(
            tmp_path,
            f"actions:\n  - {{kind: a, match: {first}}}\n  - {{kind: b, match: {later}}}\n",
        )
    )
    assert [a.kind for a in policy.actions] == ["a", "b"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("    when: {}", "when: {} holds no condition"),
        ("    when: {json: {}}", "json: {} holds no condition"),
        ("    when: {json: {amount: {}}}", "condition on 'json.amount': an empty condition {}"),
        ("    when: {model: {}}", "condition on 'model': an empty condition {}"),
        ('    when: {"json.amount": {}}', "condition on 'json.amount': an empty condition {}"),
        ("    when: {json: {amount: {in: []}}}", "'in' takes a list of at least one value"),
        ("    when: {json: {amount: {not_in: []}}}", "'not_in' takes a list of at least one value"),
        ("    when: {header: {}}", "header: {} holds no condition"),
    ],
)
def test_an_empty_condition_is_refused_not_taken_as_always_true(
    tmp_path: Path, lines: str, message: str
) -> None:
    """`when: {}` would turn a conditional allow into an unconditional one."""
    found = problems(
        tmp_path,
        f"""actions:
  - {{kind: refund.issue, match: {{host: api.stripe.com}}}}
authority:
  default: deny
  rules:
  - scope: "*"
    allow: [refund.issue]
{lines}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert len(found) == 1 and found[0].startswith(f"{f}:8: ") and message in found[0], found


@pytest.mark.parametrize(
    "match",
    [
        "{host: a.example, json: {}}",
        "{host: a.example, query: {}}",
        "{host: a.example, json: {amount: {}}}",
        "{host: a.example, header: {x-tier: {}}}",
    ],
)
def test_an_empty_condition_in_a_match_is_refused(tmp_path: Path, match: str) -> None:
    found = problems(tmp_path, f"actions:\n  - kind: a\n    match: {match}\n")
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'policy.yaml'}:3: "), found


@pytest.mark.parametrize(
    "header",
    [
        "Authorization",
        "proxy-authorization",
        "X-API-Key",
        "x-goog-api-key",
        "api-key",
        "Cookie",
        "Set-Cookie",
        "X-Auth-Token",
        "Ocp-Apim-Subscription-Key",
        "X-Client-Secret",
    ],
)
def test_a_credential_header_is_no_identity_source(tmp_path: Path, header: str) -> None:
    """SPEC §6: API keys are never stored; an identity value is stored in every scope path."""
    found = problems(tmp_path, f"identity:\n  tenant: [{{header: {header}}}, {{value: acme}}]\n")
    assert len(found) == 1, found
    assert found[0].startswith(
        f"{tmp_path / 'policy.yaml'}:2: identity.tenant: header '{header}' carries a credential"
    )


def test_headers_that_name_callers_are_identity_sources(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """identity:
  tenant: [{header: X-Auth-Request-User}]
  agent: [{header: X-Drawdown-Agent}, {header: X-Forwarded-User}]
  run: [{header: X-Session-Id}]
""",
        )
    )
    assert [s.arg for s in policy.identity["agent"]] == ["X-Drawdown-Agent", "X-Forwarded-User"]


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{method: GTE}", "'GTE' is not an HTTP method (did you mean 'GET'?)"),
        (
            "{method: 'GET,POST'}",
            "'GET,POST' is several methods in one text: list them as method: [GET, POST]",
        ),
        ("{method: 'GET POST'}", "'GET POST' is several methods in one text"),
        ("{method: [GET, PSOT]}", "'PSOT' is not an HTTP method (did you mean 'POST'?)"),
        ("{method: '*'}", "leave 'method' out to match every method"),
        ("{path: '/v1/refunds?x=1'}", "holds a query string, but paths are matched without it"),
        (
            "{path: '/api/:id'}",
            "':id' would only match the text ':id'; a segment is captured as {id}",
        ),
        ("{host: 'api.anthropic.com['}", "host pattern 'api.anthropic.com[' is not a valid glob"),
        ("{host: 'api.a.com,api.b.com'}", "holds ',', which no host name does (list several"),
        ("{host: '[::1'}", "write an IPv6 address as [ADDRESS]:PORT"),
        ("{host: '[::1]8443'}", "write an IPv6 address as [ADDRESS]:PORT"),
        ('{header: {"X Bad": 1}}', "'X Bad' is not a valid header name"),
    ],
)
def test_match_patterns_that_can_never_match_are_refused(
    tmp_path: Path, match: str, message: str
) -> None:
    found = problems(tmp_path, f"actions:\n  - kind: a\n    match: {match}\n")
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'policy.yaml'}:3: "), found
    assert message in found[0], found


def test_a_header_name_with_a_space_is_refused_where_a_policy_names_one(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """actions:
  - {kind: a, match: {host: a.example}, cost: {usd: 1}, cost_header: "X Request Cost"}
authority:
  rules:
    - {scope: "*", allow: [a], when: {"header.X Bad": "1"}}
    - {scope: "*", allow: [a], when: {header: {"X Bad": "1"}}}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert found == [
        f"{f}:2: 'X Request Cost' is not a valid header name",
        f"{f}:5: 'header.X Bad' does not name a valid header",
        f"{f}:6: 'X Bad' is not a valid header name",
    ]


def test_a_condition_on_an_identity_header_is_refused_where_a_policy_names_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The proxy strips X-Drawdown-* headers before actions and rules read them: a condition on
    one never held live (every crm.read refused), and `check` accepted it. An identity source
    reading one stays valid: identity reads the headers before they are stripped."""
    from drawdown.cli import main

    found = problems(
        tmp_path,
        """identity:
  agent: [{header: X-Drawdown-Agent}]
actions:
  - {kind: crm.read, match: {host: crm.example.com, header: {X-Drawdown-Tier: gold}}}
  - {kind: crm.write, match: {host: crm.example.com}}
authority:
  rules:
    - {name: tier, scope: "*", action: crm.read, when: {header: {X-Drawdown-Tier: {eq: gold}}}}
    - {scope: "*", action: crm.read, when: {"header.x-drawdown-run": "r1"}}
    - {scope: "*", action: crm.write, requires: [{action: crm.read, same: header.X-Drawdown-Run}]}
    - {scope: "*", action: crm.write, when: {header: {X-Drawdowns: "1"}}}
""",
    )
    f = str(tmp_path / "policy.yaml")
    never = "an identity header, which the proxy removes before any action or rule reads it"
    assert [p.split(": ", 1)[0] for p in found] == [f"{f}:4", f"{f}:8", f"{f}:9", f"{f}:10"]
    assert all(never in p for p in found), found
    assert "'X-Drawdown-Tier' is" in found[0] and "'x-drawdown-run' is" in found[2]
    assert main(["check", f]) == 1  # as `check` prints them: FILE:LINE: message
    assert capsys.readouterr().out.splitlines() == found


def test_a_condition_on_the_proxys_credentials_is_refused(tmp_path: Path) -> None:
    """The proxy strips Proxy-Authorization before actions and rules read it too: a rule on it
    never held, and `check` accepted it."""
    found = problems(
        tmp_path,
        """actions:
  - {kind: crm.read, match: {host: crm.example.com}}
authority:
  rules:
    - {scope: "*", action: crm.read, when: {header: {Proxy-Authorization: {exists: true}}}}
""",
    )
    assert [p.split(": ", 1)[0] for p in found] == [f"{tmp_path / 'policy.yaml'}:5"]
    assert "'Proxy-Authorization' is the proxy's credentials, which the proxy removes" in found[0]


def test_methods_and_ipv6_hosts_that_do_match_are_accepted(tmp_path: Path) -> None:
    from drawdown.policy.match import compile_host

    policy = load_policy(
        write(
            tmp_path,
            """actions:
  - {kind: a, match: {method: [get, PROPFIND, QUERY], host: "[::1]:8443"}}
  - {kind: b, match: {host: "[::1]"}}
  - {kind: c, match: {host: "api-[ab].example.com", path: "/v1beta/models/{model}:generateContent"}}
""",
        )
    )
    assert policy.actions[0].match.methods == ("GET", "PROPFIND", "QUERY")
    host = compile_host("[::1]:8443")  # requests carry an IPv6 host without its brackets
    assert host.matches("::1", 8443) and not host.matches("::1", 443)
    assert compile_host("[::1]").matches("::1", 443)
    assert compile_host("api-[ab].example.com").matches("api-b.example.com", 443)


@pytest.mark.parametrize(
    ("scope", "what"),
    [
        ("agent: research", "a space"),
        ("agent:*, run:*", "':'"),
        ("agent:*.run:*", "':'"),
        ("agent:a:b", "':'"),
        ("tenant:acme /agent:x", "a space"),
    ],
)
def test_scope_patterns_that_can_never_match_are_refused(
    tmp_path: Path, scope: str, what: str
) -> None:
    """Identity values are escaped (`:` is %3A, a space %20): a glob asking for one never matches."""
    found = problems(tmp_path, f'budgets:\n  - {{scope: "{scope}", usd: 1}}\n')
    assert len(found) == 1, found
    assert found[0].startswith(f"{tmp_path / 'policy.yaml'}:2: scope '{scope}' can never match: ")
    assert f"holds {what}, which identity values never do" in found[0]
    assert "agent:research/run:*" in found[0]
    assert load_policy(write(tmp_path, 'budgets:\n  - {scope: "agent:[:x]*", usd: 1}\n')).budgets


def test_meter_keys_are_checked(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """meter:
  safety_factor: {claud: 3, anthropic_typo: 1.5, anthropic: 1.2}
  max_output_tokens:
    "claude-opus-*": 8192
    "antropic:claude-*": 100
    "gpt-4o": 100
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert found == [
        f"{f}:2: unknown model family 'claud' in safety_factor (did you mean 'claude'?)",
        f"{f}:2: unknown model family 'anthropic_typo' in safety_factor (expected one of: "
        "claude, gemini; OpenAI models are counted with their own tokenizer)",
        f"{f}:2: unknown model family 'anthropic' in safety_factor (did you mean 'claude'?)",
        f"{f}:4: max_output_tokens key 'claude-opus-*' matches no request: keys are "
        "PROVIDER:MODEL globs with PROVIDER one of openai, anthropic, gemini, bedrock "
        "(e.g. 'anthropic:claude-opus-*', '*:gpt-4o*')",
        f"{f}:5: max_output_tokens key 'antropic:claude-*' names no provider "
        "(did you mean 'anthropic:claude-*'?)",
        f"{f}:6: max_output_tokens key 'gpt-4o' matches no request: keys are PROVIDER:MODEL "
        "globs with PROVIDER one of openai, anthropic, gemini, bedrock "
        "(e.g. 'anthropic:claude-opus-*', '*:gpt-4o*')",
    ]
    policy = load_policy(
        write(
            tmp_path,
            """meter:
  safety_factor: {claude: 1.5, gemini: 1.2}
  max_output_tokens: {"anthropic:claude-opus-*": 8192, "*claude*": 100, "*:gpt-4o*": 50, "open*": 7}
""",
        )
    )
    assert policy.meter.output_cap("anthropic", "claude-sonnet-4") == 100
    assert policy.meter.output_cap("openai", "gpt-4o-mini") == 50


def test_passthrough_beside_a_hostless_action_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The running proxy logs it; `check` says the same, and the policy stays valid (exit 0)."""
    from drawdown import cli

    path = write(
        tmp_path,
        """unknown_hosts: passthrough
actions:
  - {kind: llm, provider: openai, match: {host: api.openai.com}}
  - {kind: other, match: {}}
""",
    )
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{path}:1: warning: unknown_hosts: passthrough has no effect: the action at {path}:4 "
        "matches every host"
    )
    assert out[1].startswith(f"{path}: ok — ")
    write(
        tmp_path, "unknown_hosts: passthrough\nactions:\n  - {kind: a, match: {host: a.example}}\n"
    )
    assert load_policy(path).warnings == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "actions:\n  - {kind: a, match: {host: x.com}\n  - {kind: b, match: {}}\n",
            ":2: YAML syntax error: unclosed flow mapping '{': expected ',' or '}', but got '-' "
            "at line 3",
        ),
        (
            "actions:\n  - {kind: a, match: {host: x.com,\n  - {kind: b, match: {}}\n",
            ":2: YAML syntax error: unclosed flow mapping '{': expected the node content, but "
            "found '-' at line 3",
        ),
        (
            "budgets: [{scope: 'a:*', usd: 1}\nmode: shadow\n",
            ":1: YAML syntax error: unclosed flow sequence '[': ",
        ),
        (
            'mode: "shadow\nbudgets: []\nactions: []\n',
            ':1: YAML syntax error: unclosed quoted text (its " is never closed): found '
            "unexpected end of stream at the end of the file",
        ),
        (
            "actions:\n  - kind: a\n  match: {}\n",
            ":3: YAML syntax error: this line is probably mis-indented: it lines up with no key "
            "or item above it (expected <block end>, but found '?')",
        ),
        (
            "mode: enforce\nbudgets\nactions: []\n",
            ":2: YAML syntax error: a line with neither 'key: value' nor '- item': could not "
            "find expected ':' at line 3",
        ),
    ],
)
def test_yaml_syntax_errors_name_the_line_to_fix(tmp_path: Path, text: str, expected: str) -> None:
    """PyYAML notices an unclosed `{` or quote where the next construct begins: the line that
    opened it is the one to fix."""
    found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'policy.yaml'}{expected}"), found


def test_a_leading_zero_is_refused_as_ambiguous_and_yaml_1_1_numbers_are_not_read(
    tmp_path: Path,
) -> None:
    found = problems(
        tmp_path,
        """budgets:
  - {name: a, scope: "agent:*", requests: 010}
  - {name: b, scope: "agent:*", requests: 1:30}
  - {name: c, scope: "agent:*", usd: 1e-999999999}
  - {name: d, scope: "agent:*", usd: 1e-10}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert found == [
        f"{f}:2: the number 010 has a leading zero, which YAML 1.1 reads as octal and YAML 1.2 "
        "as decimal: write 10, or quote it ('010') for text",
        f"{f}:3: requests must be a whole number ≥ 0, not '1:30'",  # YAML 1.1 read 90
        f"{f}:4: usd: 1E-999999999 USD is more precise than a nano-dollar",  # not $0
        f"{f}:5: usd: 1E-10 USD is more precise than a nano-dollar",
    ]
    policy = load_policy(
        write(tmp_path, 'budgets:\n  - {scope: "agent:*", requests: 10, tokens: 0x10, usd: 0}\n')
    )
    assert (policy.budgets[0].limits.requests, policy.budgets[0].limits.tokens) == (10, 16)


def test_upper_case_yaml_extensions_in_a_folder_are_read(tmp_path: Path) -> None:
    from drawdown.policy import policy_fingerprint

    write(tmp_path, 'budgets:\n  - {scope: "tenant:*", usd: 1}\n', "a.yaml")
    write(tmp_path, 'budgets:\n  - {scope: "agent:*", usd: 1}\n', "B.YAML")
    write(tmp_path, 'budgets:\n  - {scope: "run:*", usd: 1}\n', "c.Yml")
    policy = load_policy(tmp_path)
    assert [b.key for b in policy.budgets] == ["agent:*", "tenant:*", "run:*"]  # B.YAML first
    # The live reloader watches the same files.
    assert {Path(str(f)).name for f, *_ in policy_fingerprint(tmp_path)} == {
        "a.yaml",
        "B.YAML",
        "c.Yml",
    }


def test_messages_quote_values_as_written_and_say_what_is_expected(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """budgets:
  - {scope: "agent:*", usd: 1,000}
actions:
  - {kind: a, match: {host: x.com}, cost: 0.002}
rules:
  - {scope: "*", allow: [a]}
""",
    )
    f = str(tmp_path / "policy.yaml")
    assert found == [
        f"{f}:2: unknown key '000' in budget (a number is written without thousands "
        "separators: 1000, not 1,000)",
        f"{f}:4: cost is a mapping {{usd: AMOUNT}}, not the number 0.002 (write cost: {{usd: 0.002}})",
        f"{f}:5: unknown key 'rules' in the policy ('rules' belongs under 'authority:')",
    ]
    # A number too long to read is reported once, cut short; not followed by "not null".
    found = problems(tmp_path, 'budgets:\n  - {scope: "agent:*", requests: ' + "9" * 5000 + "}\n")
    assert found == [f"{f}:2: cannot read the value '{'9' * 39}…' (5,000 characters) as !!int"]
    found = problems(tmp_path, f'budgets:\n  - {{scope: "agent:*", requests: {"9" * 4000}}}\n')
    assert len(found) == 1 and len(found[0]) < len(f) + 100, found


@pytest.mark.parametrize("breaker", ["\x85", "\u2028", "\u2029"])
def test_a_line_break_only_yaml_1_1_knows_does_not_move_later_lines(
    tmp_path: Path, breaker: str
) -> None:
    """YAML 1.1 breaks lines at NEL, LS and PS too; editors show them inside a line. Counted,
    a problem after one was reported a line further on per break (the fuzz test found one
    past the end of the file)."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        f'identity:\n  tenant: [{{value: "a{breaker}{breaker}b"}}]\nmode: sometimes\n',
        encoding="utf-8",
    )
    with pytest.raises(PolicyInvalid) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}:3: mode must be one of"), str(err.value)


def test_a_text_field_compared_with_a_list_is_refused(tmp_path: Path) -> None:
    """`model: [gpt-4o, gpt-4o-mini]` (meant as `in: [...]`) compared the model's name with a
    list: the deny never fired, and `check` said ok. A query parameter, header, path segment
    or model is one piece of text; a JSON field may well hold a list, and may be compared so."""
    f = tmp_path / "policy.yaml"
    text = """
actions:
  - {kind: chat, provider: openai, match: {host: api.openai.com, header: {x-team: [a, b]}}}
  - {kind: crm.read, match: {host: crm.example.com, path: "/customers/{cid}"}}
authority:
  rules:
    - {scope: "*", deny: [chat], when: {model: [gpt-4o, gpt-4o-mini]}}
    - {scope: "*", deny: [chat], when: {model: {ne: [gpt-4o]}}}
    - {scope: "*", deny: [crm.read], when: {query: {x: {in: [[1, 2]]}}}}
    - {scope: "*", deny: [crm.read], when: {path.cid: {not_in: [{a: 1}]}}}
    - {scope: "*", deny: [chat], when: {json.tags: [a, b], model: {in: [gpt-4o]}}}
"""
    never = "never equals a list, so this condition never holds (to match any of several values"
    assert problems(tmp_path, text) == [
        f"{f}:3: 'header.x-team' is one piece of text and {never}, write header.x-team: "
        "{in: [A, B]})",
        f"{f}:7: 'model' is one piece of text and {never}, write model: {{in: [A, B]}})",
        f"{f}:8: 'model' is one piece of text and never equals a list, so this condition "
        "always holds (to exclude several values, write model: {not_in: [A, B]})",
        f"{f}:9: 'query.x' is one piece of text and {never}, write query.x: {{in: [A, B]}})",
        f"{f}:10: 'path.cid' is one piece of text and never equals a mapping, so this "
        "condition always holds (to exclude several values, write path.cid: {not_in: [A, B]})",
    ]
    valid = """
actions:
  - {kind: chat, provider: openai, match: {host: api.openai.com, header: {x-team: {in: [a, b]}}}}
authority:
  rules:
    - {scope: "*", deny: [chat], when: {json.tags: [a, b], model: {in: [gpt-4o, o3]}}}
"""
    assert len(load_policy(write(tmp_path, valid)).authority.rules) == 1


def test_model_on_actions_that_are_no_llm_calls_is_refused(tmp_path: Path) -> None:
    """Only an LLM call has a model: `when: {model: …}` on a tool's action never held (a
    deny never fired), or held always (`ne`), and a requirement on it refused every call.
    An LLM action among those a rule covers makes it valid."""
    f = tmp_path / "policy.yaml"
    text = """
actions:
  - {kind: chat, provider: openai, match: {host: api.openai.com}}
  - {kind: crm.read, match: {host: crm.example.com}}
  - {kind: docs, provider: mcp, match: {host: mcp.example.com}}
authority:
  rules:
    - {scope: "*", deny: [crm.read], when: {model: {in: [gpt-4o]}}}
    - {scope: "*", deny: ["docs.*"], when: {model: {ne: gpt-4o}}}
    - {scope: "*", action: chat, requires: [{action: crm.read, same: model}]}
    - {scope: "*", deny: [chat, crm.read], when: {model: gpt-4o}}
    - {scope: "*", deny: [crm.read], when: {model: {exists: false}}}
"""
    tool = "'model' is known for LLM calls only, and no action this applies to is one"
    assert problems(tmp_path, text) == [
        f"{f}:8: {tool} (crm.read: no provider): this condition never holds",
        f"{f}:9: {tool} (docs: provider mcp): this condition always holds",
        f"{f}:10: {tool} (crm.read: no provider): this requirement is never met, and every "
        "call it covers is refused",
        f"{f}:12: {tool} (crm.read: no provider): this condition always holds",
    ]


def test_a_body_field_on_get_only_actions_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`json.X` on actions that match GET only: their requests carry no body, so a deny on it
    never fires and a requirement on it refuses every call. A warning, not an error: a few
    APIs (Elasticsearch's _search) read a GET's body, and an action that matches a body
    itself says its API is one of them."""
    from drawdown import cli

    path = write(
        tmp_path,
        """
actions:
  - {kind: crm.search, match: {host: crm.example.com, method: GET, json: {q: {exists: true}}}}
  - {kind: crm.read, match: {host: crm.example.com, method: [GET, HEAD]}}
  - {kind: crm.write, match: {host: crm.example.com, method: POST}}
  - {kind: refund, match: {host: api.stripe.com}}
authority:
  rules:
    - {scope: "*", deny: [crm.read], when: {json.amount: {gt: 5}}}
    - {scope: "*", action: refund, requires: [{action: crm.read, same: json.customer}]}
    - {scope: "*", deny: [crm.search], when: {json.amount: {gt: 5}}}
    - {scope: "*", deny: ["crm.*"], when: {json.amount: {gt: 5}}}
""",
    )
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    body = (
        "is read from the request's body, but every action this applies to matches GET or "
        "HEAD only (crm.read: GET or HEAD), which carry no body as a rule: unless this API "
        "reads one on them,"
    )
    assert out[:-1] == [
        f"{path}:9: warning: 'json.amount' {body} this condition never holds",
        f"{path}:10: warning: 'json.customer' {body} this requirement is never met, and every "
        "call it covers is refused",
    ]
    assert out[-1].startswith(f"{path}: ok — ")


@pytest.mark.parametrize(
    ("extra", "outcome"),
    [
        ("", "no request is classified, so no budget, rule or anomaly check applies to any"),
        ("unknown_hosts: deny\n", "every request is refused (unknown_hosts: deny)"),
    ],
)
def test_a_policy_with_no_actions_is_a_warning(tmp_path: Path, extra: str, outcome: str) -> None:
    """A folder left with its `version: 1` file only (the rest renamed, moved) is a valid
    policy: loaded by a running proxy, it took every deny and budget away without a word."""
    folder = tmp_path / "policy"
    folder.mkdir()
    write(folder, f"version: 1\n{extra}", "00-version.yaml")
    assert [str(w) for w in load_policy(folder).warnings] == [
        f"{folder / '00-version.yaml'}:1: warning: the policy defines no actions: {outcome}"
    ]
    write(folder, "actions:\n  - {kind: a, match: {host: a.example}}\n", "10-actions.yaml")
    assert load_policy(folder).warnings == ()


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("version: 1\nmode:\u00a0shadow\n", ":2: YAML syntax error: a line with neither "),
        ("version:\u2003 1\nmode: shadow\n", ":2: YAML syntax error: mapping values are not "),
        ("actions:\n  - kind:\u00a0a\n    match: {}\n", ":3: YAML syntax error: mapping values "),
    ],
)
def test_a_lookalike_space_is_named(tmp_path: Path, text: str, found: str) -> None:
    """Pasted from a web page or a chat, `mode:\u00a0shadow` is one piece of text to YAML, and
    PyYAML's error, on that line or the next, said nothing of the character."""
    (problem,) = problems(tmp_path, text)
    name = "EM SPACE, U+2003" if "\u2003" in text else "NO-BREAK SPACE, U+00A0"
    line = 1 if "\u2003" in text else 2
    assert found in problem
    assert problem.endswith(
        f"(line {line} holds the character {name}, where YAML needs a plain space)"
    )


REQUIRES_ON_LATER_LINES = """actions:
  - {kind: crm.read, match: {host: crm.example, method: GET, path: "/c/{cid}"}}
  - {kind: refund, match: {host: pay.example}}
authority:
  rules:
    - name: read-first
      scope: "*"
      action: refund
      requires:
        - action: crm.read
          same: {json.customer: path.id}
"""


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"p.yaml": "%YAML 1.1\n"},
            ["p.yaml:1: YAML syntax error: expected '<document start>', but found '<stream end>'"],
            id="directive-without-document-not-past-the-end",
        ),
        pytest.param(
            {"p.yaml": 'mode: "shadow\nbudgets: []\n'},
            [
                'p.yaml:1: YAML syntax error: unclosed quoted text (its " is never closed): found '
                "unexpected end of stream at the end of the file"
            ],
            id="unclosed-quote-names-no-line-past-the-end",
        ),
        pytest.param(
            {"p.yaml": "actions: [\n"},
            [
                "p.yaml:1: YAML syntax error: unclosed flow sequence '[': expected the node "
                "content, but found '<stream end>' at the end of the file"
            ],
            id="unclosed-flow-at-the-end",
        ),
        pytest.param(
            {"p.yaml": "budgets:\n  - {scope: 'a:*', usd: 1"},
            [
                "p.yaml:2: YAML syntax error: unclosed flow mapping '{': expected ',' or '}', "
                "but got '<stream end>' at the end of the file"
            ],
            id="unclosed-flow-on-the-last-line",
        ),
        pytest.param(
            {"p.yaml": "# a policy\n\nmode shadow\n"},
            ["p.yaml:3: a policy file must be a mapping of sections"],
            id="document-that-is-text",
        ),
        pytest.param(
            {"p.yaml": "# a policy\n\n!!int abc\n"},
            [
                "p.yaml:3: cannot read the value 'abc' as !!int",
                "p.yaml:3: a policy file must be a mapping of sections",
            ],
            id="document-that-is-an-unreadable-scalar",
        ),
        pytest.param(
            {
                "p.yaml": "actions:\n  - {kind: a, match: {host: a.example}}\nbudgets:\n"
                '  - &run {scope: "agent:*/run:*", usd: 1}\n  - *run\n'
            },
            [
                "p.yaml:5: budget 'agent:*/run:*' is defined twice (first at p.yaml:4); give one "
                "a distinct name"
            ],
            id="alias-is-reported-where-it-stands",
        ),
        pytest.param(
            {"p.yaml": "actions:\n  - &a {kind: a, match: {host: a.example}}\n  - *a\n"},
            [
                "p.yaml:3: action 'a' can never match: the action 'a' at p.yaml:2 matches every "
                "request this one would, first (actions are tried in order: put the narrower "
                "action first)"
            ],
            id="aliased-action",
        ),
        pytest.param(
            {"p.yaml": "budgets:\n  - &b {scope: 'agent:*', usd: !!int x}\n  - *b\n"},
            ["p.yaml:2: cannot read the value 'x' as !!int"],  # where its text is, once
            id="aliased-unreadable-value",
        ),
        pytest.param(
            {"p.yaml": REQUIRES_ON_LATER_LINES},
            [
                "p.yaml:11: 'path.id' is captured by no action it applies to (crm.read: /c/{cid}): "
                "name a {id} segment in the action's path pattern"
            ],
            id="requirement-field-at-its-same-key",
        ),
        pytest.param(
            {
                "p.yaml": REQUIRES_ON_LATER_LINES.replace("path.id", "json.customer")
                .replace("{host: pay.example}", "{host: crm.example, method: POST, path: /c}")
                .replace("refund", "crm.list")
            },
            [
                "p.yaml:11: warning: 'json.customer' is read from the request's body, but every "
                "action this applies to matches GET or HEAD only (crm.read: GET), which carry no "
                "body as a rule: unless this API reads one on them, this requirement is never "
                "met, and every call it covers is refused"
            ],
            id="requirement-warning-at-its-same-key-once",
        ),
        pytest.param(
            {
                "p.yaml": "mode: shadow\nactions:\n  - {kind: a, match: {host: a.example}}\n"
                "budgets:\n  - scope: 'agent:*'\n    usd: 1\n    mode: enforce\n"
                "authority:\n  rules:\n    - scope: '*'\n      allow: [a]\n      mode: enforce\n"
            },
            [
                f"p.yaml:{line}: warning: mode: enforce on this {kind} has no effect: the policy "
                "is in shadow mode, which blocks nothing (set the policy's mode to enforce, and "
                "mode: shadow on what is still on trial)"
                for line, kind in ((7, "budget"), (12, "rule"))
            ],
            id="enforce-in-shadow-at-its-mode-key",
        ),
        pytest.param(
            {"00-version.yaml": "version: 1\n", "10-actions.yaml": "# to fill in\nactions: []\n"},
            [
                "10-actions.yaml:2: warning: the policy defines no actions: no request is "
                "classified, so no budget, rule or anomaly check applies to any"
            ],
            id="no-actions-at-the-empty-actions-key",
        ),
    ],
)
def test_every_problem_names_the_line_at_fault(
    tmp_path: Path, files: dict[str, str], expected: list[str]
) -> None:
    """`FILE:0:` or a line past the end of the file, or one far from the text at fault (the
    anchor of an alias, the first line of a long rule), sends a policy's author nowhere."""
    folder = tmp_path / "policy"
    folder.mkdir()
    for name, text in files.items():
        write(folder, text, name)
    path = folder if len(files) > 1 else folder / next(iter(files))
    try:
        found = list(load_policy(path).warnings)
    except PolicyInvalid as exc:
        found = exc.problems
    assert [str(p).replace(f"{folder}/", "") for p in found] == expected


REGEX_RULE = """actions:
  - {kind: tool.call, match: {host: tool.example.com}}
authority:
  rules:
    - {name: no-runs-of-a, scope: "*", deny: [tool.call], when: {json.q: {regex: "^(a+)+$"}}}
"""


@pytest.mark.parametrize(
    ("text", "denied"), [("a" * 64 + "!", False), ("a" * 64, True)], ids=["no-match", "match"]
)
def test_a_regex_condition_decides_in_linear_time_on_what_an_agent_sends(
    tmp_path: Path, text: str, denied: bool
) -> None:
    """Python's backtracking `re` took longer than anyone would wait on `^(a+)+$` against 64
    a's and a `!` (2^64 ways to split them), on the event loop every agent's request passes
    through. The timeout only bounds a hang: RE2 answers in microseconds."""
    policy = write(tmp_path, REGEX_RULE)
    command = [sys.executable, "-m", "drawdown", "explain", "--policy", str(policy), "--method",
               "POST", "--url", "https://tool.example.com/q", "--json", json.dumps({"q": text}),
               "--as-json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)["decision"]
    assert (decision == "deny") is denied, decision


def test_a_regex_that_needs_backtracking_is_refused_saying_why(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    rule = '    - {scope: "*", deny: [tool.call], when: {json.q: {regex: %s}}}\n'
    head = REGEX_RULE.rsplit("    - ", 1)[0]
    linear = " (patterns run on RE2, in linear time: no lookaround or backreferences)"
    for pattern, expected in (
        ("'^(?!admin)'", f"invalid regex '^(?!admin)': invalid perl operator: (?!{linear}"),
        ("'(?<=x)y'", f"invalid regex '(?<=x)y': invalid perl operator: (?<={linear}"),
        ("'(a)\\1'", f"invalid regex '(a)\\1': invalid escape sequence: \\1{linear}"),
        (
            "'end\\Z'",
            "invalid regex 'end\\Z': invalid escape sequence: \\Z (RE2 writes the end of the "
            "text as \\z)",
        ),
    ):
        assert problems(tmp_path, head + rule % pattern) == [
            f"{f}:5: condition on 'json.q': {expected}"
        ], pattern


def load_in_a_thread(path: Path) -> BaseException | None:
    """load_policy's outcome, or a failure if it is still reading after a minute (a read that
    blocks would hang the test itself)."""
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_policy(path)
            outcome.append(None)
        except BaseException as exc:  # handed to the test, whatever it is
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome, f"load_policy({path}) was still reading after 60 s"
    return outcome[0]


def test_a_named_pipe_named_like_a_policy_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    """`mkfifo budgets.yaml` in the policy folder hung the reading thread until something
    wrote to it: the watcher ignored every later edit in silence, `drawdown check` never
    returned, and the proxy could not exit."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "actions.yaml").write_text("mode: enforce\n")
    os.mkfifo(folder / "budgets.yaml")
    caught = load_in_a_thread(folder)
    assert isinstance(caught, PolicyInvalid)
    assert str(caught).splitlines() == [
        f"{folder / 'budgets.yaml'}:0: cannot read: a named pipe (FIFO), not a file"
    ]
    caught = load_in_a_thread(folder / "budgets.yaml")  # named alone, as `--policy`
    assert isinstance(caught, PolicyInvalid) and "a named pipe (FIFO), not a file" in str(caught)


def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_seen_to_change(
    tmp_path: Path,
) -> None:
    """`cp -p` or `rsync -a` to a temporary name, then `mv`: an edit of `agent:x` to `agent:y`
    keeps the size, and the copy keeps the mtime. The watcher compared those two only."""
    from drawdown.policy import policy_fingerprint

    policy = write(tmp_path, 'budgets:\n  - {scope: "agent:x", usd: 1}\n')
    before = policy_fingerprint(tmp_path)
    replacement = write(tmp_path, 'budgets:\n  - {scope: "agent:y", usd: 1}\n', ".policy.tmp")
    status = policy.stat()
    os.utime(replacement, ns=(status.st_atime_ns, status.st_mtime_ns))
    os.replace(replacement, policy)
    after = policy_fingerprint(tmp_path)
    assert policy.stat().st_mtime_ns == status.st_mtime_ns
    assert policy.stat().st_size == status.st_size
    assert after != before


def test_a_host_no_request_can_have_is_refused(tmp_path: Path) -> None:
    """`.openai.com` (NO_PROXY's spelling of a domain) matched nothing, so the calls it was
    meant to govern fell to `unknown_hosts`; `check` said nothing."""
    f = tmp_path / "policy.yaml"
    for host, expected in (
        (
            ".openai.com",
            "host pattern '.openai.com' has an empty label: no host does (for a domain and "
            "every host under it, write both: [openai.com, '*.openai.com'])",
        ),
        ("api..openai.com", "host pattern 'api..openai.com' has an empty label: no host does"),
        ("999.1.1.1", "host pattern '999.1.1.1' is no IPv4 address: a part is over 255"),
    ):
        text = f"actions:\n  - {{kind: llm, provider: openai, match: {{host: '{host}'}}}}\n"
        assert problems(tmp_path, text) == [f"{f}:2: {expected}"], host
    for host in ("api.openai.com.", "10.0.0.1", "1.2.3.*", "*.openai.com", "[::1]:8443"):
        text = f"actions:\n  - {{kind: llm, provider: openai, match: {{host: '{host}'}}}}\n"
        load_policy(write(tmp_path, text))


def test_record_and_version_written_as_words_say_how_to_write_them(tmp_path: Path) -> None:
    """`record: none` said "record must be a mapping, not text 'none'", and `version: "1"`
    "unsupported policy version '1' (this drawdown reads version 1)"."""
    f = tmp_path / "policy.yaml"
    assert problems(tmp_path, 'version: "1"\nrecord: none\n') == [
        f"{f}:1: version is a number: write `version: 1`, not the text '1'",
        f"{f}:2: record is a mapping: write `record: {{bodies: none}}`",
    ]
    assert problems(tmp_path, "version: true\n") == [
        f"{f}:1: unsupported policy version: true (this drawdown reads 1)"
    ]


def test_a_space_yaml_does_not_read_as_one_is_named_where_it_hides(tmp_path: Path) -> None:
    """A byte order mark opening the file was named as the cause of a tab two lines down (the
    tab's own hint lost), and a no-break space in a flow mapping went unnamed."""
    f = tmp_path / "policy.yaml"
    f.write_bytes("\ufeffversion: 1\n\tmode: enforce\n".encode())
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(f)
    assert str(caught.value) == (
        f"{f}:2: YAML syntax error: found character '\\t' that cannot start any token "
        "(indent with spaces, not tabs)"
    )
    nbsp = "the character NO-BREAK SPACE, U+00A0, where YAML needs a plain space"
    assert problems(tmp_path, "actions:\n  - {kind: a, match: {host:\u00a0x.com}}\n") == [
        f"{f}:2: unknown key 'host:\\xa0x.com' in match (it holds {nbsp})"
    ]
    assert problems(tmp_path, 'actions:\n  - {kind: a, match: "host:\u00a0x.com"}\n') == [
        f"{f}:2: match must be a mapping, not text 'host:\\xa0x.com' (it holds {nbsp})"
    ]


def test_requirements_in_a_circle_are_refused_as_never_met(tmp_path: Path) -> None:
    """`action: a, requires: [a]` and `b` requiring `c` requiring `b` loaded without a word,
    and every such call was refused: no run can make the first."""
    f = tmp_path / "policy.yaml"
    text = """actions:
  - {kind: a, match: {host: a.example.com}}
  - {kind: b, match: {host: b.example.com}}
  - {kind: c, match: {host: c.example.com}}
  - {kind: d, match: {host: d.example.com}}
authority:
  rules:
    - {scope: "*", action: a, requires: [a]}
    - {scope: "agent:x", action: b, requires: [c]}
    - {scope: "agent:x", action: c, requires: [b]}
    - {scope: "agent:y", action: d, requires: [c]}
"""
    circle = "which can never come first either (the requirements go round in a circle)"
    assert problems(tmp_path, text) == [
        f"{f}:8: 'a' can never be allowed: it requires an earlier successful a in the same "
        "run, so no run can make the first",
        f"{f}:9: 'b' can never be allowed for agent:x: it requires an earlier successful c in "
        f"the same run, {circle}",
        f"{f}:10: 'c' can never be allowed for agent:x: it requires an earlier successful b "
        f"in the same run, {circle}",
    ]
    # A way in breaks the circle: for agent:x, b needs c or d, and d needs nothing there
    # (its requirement is agent:y's, where b needs nothing); a needs b.
    load_policy(
        write(
            tmp_path,
            text.replace("requires: [a]}", "requires: [b]}")
            .replace("requires: [c]}", "requires: [{action: [c, d]}]}", 1)
            .replace("action: d, requires: [c]", "action: d, requires: [a]"),
        )
    )


def test_mistakes_that_would_never_match_are_said_plainly(tmp_path: Path) -> None:
    """Each of these loaded (a condition that never holds, a key named "") or was refused
    with a message that did not say what was wrong (`host: ""` "must be text or a list of
    text", `requires: []` "needs 'requires:'", `USD: 5` twice, no hint for `opneai`)."""
    f = tmp_path / "policy.yaml"
    text = """actions:
  - {kind: llm, provider: opneai, match: {host: ""}}
  - {kind: b, match: {host: b.example.com, json: {"x..y": 1}}}
  - {kind: c, match: {host: c.example.com}}
budgets:
  - {scope: "agent:*", USD: 5}
authority:
  rules:
    - {scope: "*", deny: []}
    - {scope: "*", deny: [LLM]}
    - {scope: "*", action: c, requires: []}
    - {scope: "*", deny: [c], when: {json.q: {regex: ""}}}
    - {scope: "*", deny: [c], when: {json.n: {gt: 1, lt: 0}}}
    - {scope: "*", deny: [c], when: {json.n: {eq: 1, ne: 1}}}
    - {scope: "*", deny: [c], when: {json.n: {gte: 1, lte: 1}}}
    - {scope: "*", deny: [c], when: {json.n: {gt: 1, lte: 1}}}
    - {scope: "*", deny: [c], when: {json.a..b: 1}}
"""
    never = "this condition never holds"
    assert problems(tmp_path, text) == [
        f"{f}:2: provider must be one of openai, anthropic, gemini, bedrock, mcp, not 'opneai' "
        "(did you mean 'openai'?)",
        f"{f}:2: match.host is empty: give it a value, or leave 'host' out",
        f"{f}:3: 'json.x..y' has an empty key: a dotted path names each (json.a.b)",
        f"{f}:6: unknown key 'USD' in budget (did you mean 'usd'?)",
        f"{f}:9: deny is empty: list at least one, or leave 'deny' out",
        f"{f}:10: 'LLM' names no action kind of this policy (did you mean 'llm'?)",
        f"{f}:11: requires is empty: list the actions that must come first",
        f"{f}:12: condition on 'json.q': an empty regex matches every text: write {{exists: true}}",
        f"{f}:13: condition on 'json.n': no value is both gt 1 and lt 0: {never}",
        f"{f}:14: condition on 'json.n': eq and ne name the same value: {never}",
        f"{f}:16: condition on 'json.n': no value is both gt 1 and lte 1: {never}",
        f"{f}:17: 'json.a..b' has an empty key: a dotted path names each (json.a.b)",
    ]


def test_an_identity_source_after_one_that_always_gives_a_value_is_refused(
    tmp_path: Path,
) -> None:
    """`agent: [{value: bot}, {header: X-Drawdown-Agent}]` loaded, and the header was never
    read: every agent was `bot`, one budget for the whole fleet."""
    f = tmp_path / "policy.yaml"
    text = """identity:
  agent: [{value: bot}, {header: X-Drawdown-Agent}]
  run:
    - {idle_split: 10}
    - {header: X-Drawdown-Run}
  tenant: [{header: X-Tenant}, {client_ip: true}]
actions:
  - {kind: c, match: {host: c.example.com}}
"""
    first = "(sources are tried in order: put it last)"
    assert problems(tmp_path, text) == [
        f"{f}:2: identity.agent: this source is never read: {{value: bot}} at line 2 always "
        f"gives a value first {first}",
        f"{f}:5: identity.run: this source is never read: {{idle_split: 10}} at line 4 always "
        f"gives a value first {first}",
    ]


def test_merge_keys_and_x_keys_let_a_policy_say_a_thing_once(tmp_path: Path) -> None:
    """`<<: *base` was refused (and the mapping then said to lack what the base held), and a
    top-level `x-base: &base …` to hold the anchor was an unknown key: shared fields had to be
    written out in every budget."""
    text = """x-run-cap: &run-cap {scope: "agent:*/run:*", per: day}
budgets:
  - {<<: *run-cap, name: run-usd, usd: 1}
  - {<<: [*run-cap, {per: hour}], name: run-requests, requests: 10, per: month}
  - {<<: *run-cap, name: broken, usd: two}
"""
    f = tmp_path / "policy.yaml"
    # A merged value's problem stands where its `<<` does; the mapping's own keys win.
    assert problems(tmp_path, text) == [f"{f}:5: usd must be a number ≥ 0, not 'two'"]
    policy = load_policy(write(tmp_path, text.rsplit("  - ", 1)[0]))
    usd, requests = policy.budgets
    assert (usd.key, usd.scope.text, usd.per) == ("run-usd", "agent:*/run:*", "day")
    assert (requests.key, requests.per, requests.limits.requests) == ("run-requests", "month", 10)
    assert problems(tmp_path, "budgets:\n  - {<<: [1], usd: 1, scope: '*'}\n") == [
        f"{f}:2: a merge key (<<) takes a mapping or a list of them"
    ]


def test_a_regex_condition_reads_text_that_is_not_valid_unicode() -> None:
    """RE2 reads UTF-8, and a lone surrogate (a Latin-1 header or `%e9` decoded with
    surrogateescape, half an emoji escaped in JSON) raised: the request answered 500."""
    from drawdown.policy.match import compile_condition

    drop = compile_condition({"regex": "DROP"})
    assert drop("caf\udce9 DROP TABLE") and not drop("caf\udce9") and not drop("\ud83d")
    anything = compile_condition({"regex": "^caf.$"})  # the surrogate reads as one character
    assert anything("caf\udce9")


def test_a_policy_piped_to_a_command_that_reads_it_once_is_read(tmp_path: Path) -> None:
    """`drawdown check <(git show HEAD:policy.yaml)` was refused as a named pipe, which only a
    running proxy (reading its policy at every edit) and a policy folder must refuse."""
    command = [sys.executable, "-m", "drawdown", "check", "/dev/stdin"]
    text = (ROOT / "policies" / "example.yaml").read_text()
    done = subprocess.run(command, input=text, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("/dev/stdin: ok — mode enforce")
    os.mkfifo(tmp_path / "policy.yaml")
    with pytest.raises(PolicyInvalid, match="a named pipe"):
        load_policy(tmp_path / "policy.yaml")  # as `drawdown run` and its watcher read it


def test_the_circle_check_blames_the_circle_and_leaves_what_it_cannot_judge(
    tmp_path: Path,
) -> None:
    """A requirement on an MCP tool (unknown before the call) was blamed for a circle beside
    the self-requirement that made it; a typo'd kind was said twice (once as a circle); a
    rule in shadow mode refuses nothing, so it makes no circle."""
    f = tmp_path / "policy.yaml"
    head = """actions:
  - {kind: crm.write, match: {host: crm.example}}
  - {kind: mcp.docs, provider: mcp, match: {host: docs.example}}
authority:
  rules:
"""
    mcp_first = """    - {scope: "*", action: crm.write, requires: [mcp.docs.lookup]}
    - {scope: "*", action: crm.write, requires: [crm.write]}
"""
    assert problems(tmp_path, head + mcp_first) == [
        f"{f}:7: 'crm.write' can never be allowed: it requires an earlier successful crm.write "
        "in the same run, so no run can make the first"
    ]
    typo = '    - {scope: "*", action: crm.write, requires: [crm.wrte]}\n'
    assert problems(tmp_path, head + typo) == [
        f"{f}:6: 'crm.wrte' names no action kind of this policy (did you mean 'crm.write'?)"
    ]
    shadow = '    - {scope: "*", action: crm.write, requires: [crm.write], mode: shadow}\n'
    load_policy(write(tmp_path, head + shadow))
    shadow_policy = "mode: shadow\n" + head + mcp_first
    assert problems(tmp_path, shadow_policy) == [
        f"{f}:8: 'crm.write' can never be allowed once the policy enforces: it requires an "
        "earlier successful crm.write in the same run, so no run can make the first"
    ]


def test_a_repetition_re2_would_read_as_text_is_refused(tmp_path: Path) -> None:
    """`x{,3}`: Python reads {0,3}, RE2 the text '{,3}', silently."""
    f = tmp_path / "policy.yaml"
    text = REGEX_RULE.replace("^(a+)+$", "^a{,3}$")
    assert problems(tmp_path, text) == [
        f"{f}:5: condition on 'json.q': invalid regex '^a{{,3}}$': write {{,3}} as {{0,3}}"
    ]
