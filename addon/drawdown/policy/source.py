"""Read policy YAML keeping the line of every key and item, for `FILE:LINE: message` errors."""

from __future__ import annotations

import copy
import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from ..escape import printable


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy, located in its file."""

    file: str
    line: int
    message: str
    # A link whose target is missing: during a ConfigMap update, for a moment, a file dropped
    # from it (kubelet swaps `..data` first): the proxy's watcher looks twice before reporting it.
    link_to_nothing: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        # One problem, one line: a message quoting a user's text (a key with a newline, U+2028…)
        # must not break the format, so anything unprintable is escaped.
        return f"{self.file}:{self.line}: {printable(self.message)}"


class PolicyInvalid(Exception):
    """The policy cannot be used; `problems` says where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class LMap(dict):
    """A YAML mapping that remembers where it and each of its keys stand."""

    file: str
    line: int
    key_lines: dict[str, int]


class LList(list):
    """A YAML sequence that remembers where it and each of its items stand."""

    file: str
    line: int
    item_lines: list[int]


@dataclass(frozen=True)
class LScalar:
    """A document that is one scalar (text, a number…) where a mapping belongs: kept with its
    line, to be refused there, not at line 1 above the comments that precede it."""

    value: Any
    file: str
    line: int


class _Unreadable:
    """A scalar that could not be read, already reported: the checks say nothing more of it."""

    def __repr__(self) -> str:
        return "unreadable"


UNREADABLE = _Unreadable()
ECHO_LIMIT = 40  # characters of a user's value quoted back in a message


def clip(text: str) -> str:
    """`text` cut to ECHO_LIMIT characters: a 5,000-digit number is not quoted back whole."""
    return text if len(text) <= ECHO_LIMIT else f"{text[: ECHO_LIMIT - 1]}…"


def line_of(container: Any, key: str | int | None = None) -> int:
    """Line of `container[key]` (or of the container itself), 1-based; 0 if unknown."""
    if key is not None:
        if isinstance(container, LMap):
            return container.key_lines.get(str(key), container.line)
        if (
            isinstance(container, LList)
            and isinstance(key, int)
            and key < len(container.item_lines)
        ):
            return container.item_lines[key]
    return getattr(container, "line", 0)


# No real policy comes near these; a document past them is a mistake or an attack. YAML aliases
# are expanded in place, and a few nested ones multiply ("billion laughs": 9 levels of 9 aliases
# is 387 million values), so the values constructed are counted, aliases included.
MAX_VALUES = 100_000
MAX_DEPTH = 64


class _TooBig(Exception):
    def __init__(self, line: int, message: str, *, values: bool = False) -> None:
        self.problem_line, self.message, self.values = line, message, values


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: no implicit dates, and yes/no/on/off stay text."""

    _depth = 0
    aliases = False  # does the document use any? (to say why it holds so many values)

    def forward(self, length: int = 1) -> None:
        """PyYAML's Reader.forward, counting lines as editors do. YAML 1.1 also breaks lines
        at U+0085, U+2028 and U+2029, which editors show inside a line: a policy holding one
        had every later problem reported lines past its place, past the end of the file."""
        if self.pointer + length + 1 >= len(self.buffer):
            self.update(length + 1)
        while length:
            ch = self.buffer[self.pointer]
            self.pointer += 1
            self.index += 1
            if ch == "\n" or (ch == "\r" and self.buffer[self.pointer] != "\n"):
                self.line += 1
                self.column = 0
            elif ch != "\ufeff":
                self.column += 1
            length -= 1

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # PyYAML's composer recurses once a level: refuse past MAX_DEPTH at the line that goes
        # too deep, long before Python's recursion limit (3,000 levels was a RecursionError).
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooBig(mark.line + 1, f"nested more than {MAX_DEPTH} levels deep")
        alias = self.check_event(yaml.AliasEvent)
        self.aliases = self.aliases or alias
        mark = self.peek_event().start_mark if alias else None
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if mark is None:
            return node
        # PyYAML returns the anchored node itself, marked where the anchor stands: a duplicate
        # budget written `- *run` was reported at the line of `&run`, "first at" that same line.
        # A shallow copy stands where the alias does; what is inside it stays at the anchor,
        # where its text is.
        located = copy.copy(node)
        located.start_mark = mark
        return located


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool", _INT, _FLOAT)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 integers: 1.1's base-60 (`1:30` is 90) is gone. A leading zero (`010`: 8 in YAML 1.1,
# 10 in 1.2) is read as an int here only to be refused in _construct as ambiguous.
_Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+|[-+]?0o[0-7_]+|[-+]?0b[01_]+)$"),
    list("-+0123456789"),
)
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9_]+$")
# YAML 1.1 floats without the base-60 ones (`1:30.5`).
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
# YAML 1.2 floats that 1.1 reads as text: an exponent without a dot or without a sign (1e-3,
# 2.5e3). `usd: 1e-3` was refused as "not '1e-3'".
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal | float:
    # Money in policies must be exact: 0.1 stays Decimal("0.1"), never a binary float.
    text = node.value.replace("_", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return loader.construct_yaml_float(node)
    return value if value.is_finite() else float(value)


_Loader.add_constructor("tag:yaml.org,2002:float", _decimal)


def _construct(
    node: yaml.Node, file: str, problems: list[Problem], count: list[int], depth: int = 0
) -> Any:
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise _TooBig(
            node.start_mark.line + 1,
            f"the policy holds more than {MAX_VALUES:,} values",
            values=True,
        )
    if depth > MAX_DEPTH:
        raise _TooBig(node.start_mark.line + 1, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, yaml.MappingNode):
        result = LMap()
        result.file, result.line, result.key_lines = file, node.start_mark.line + 1, {}
        merged: list[tuple[LMap, int]] = []  # `<<: *base`, each with the line it stands at
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                bases = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for base in bases:
                    if not isinstance(base, yaml.MappingNode):
                        problems.append(
                            Problem(
                                file, line, "a merge key (<<) takes a mapping or a list of them"
                            )
                        )
                        continue
                    merged.append((_construct(base, file, problems, count, depth + 1), line))
                continue
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag in (
                _INT,
                _FLOAT,
                "tag:yaml.org,2002:bool",
            ):
                # A key is text: keep it as written (`000` of `{usd: 1,000}`, `1e3`), not as
                # the number it reads as.
                read: list[Problem] = []
                key = _construct(key_node, file, read, count, depth + 1)
                if key is UNREADABLE and not _LEADING_ZERO.match(key_node.value):
                    problems.extend(read)  # `!!int abc: …`
                else:
                    key = key_node.value
            else:
                key = _construct(key_node, file, problems, count, depth + 1)
            if key is UNREADABLE:  # reported
                continue
            if not isinstance(key, str | int | float | bool) or key is None:
                problems.append(
                    Problem(file, key_node.start_mark.line + 1, "mapping keys must be plain text")
                )
                continue
            key = str(key)
            if key in result:
                problems.append(
                    Problem(
                        file,
                        key_node.start_mark.line + 1,
                        f"duplicate key '{key}' (first at line {result.key_lines[key]})",
                    )
                )
                continue
            result[key] = _construct(value_node, file, problems, count, depth + 1)
            result.key_lines[key] = key_node.start_mark.line + 1
        # As YAML's merge: the mapping's own keys win, then the bases in the order listed. A
        # merged value is located where the `<<` stands, as a value used through an alias is.
        for base, line in merged:
            for key, value in base.items():
                if key not in result:
                    result[key] = value
                    result.key_lines[key] = line
        return result
    if isinstance(node, yaml.SequenceNode):
        result_list = LList()
        result_list.file, result_list.line = file, node.start_mark.line + 1
        result_list.item_lines = []
        for item in node.value:
            result_list.append(_construct(item, file, problems, count, depth + 1))
            result_list.item_lines.append(item.start_mark.line + 1)
        return result_list
    # Scalars: let the safe constructor resolve int/float/bool/null/str.
    if node.tag == _INT and _LEADING_ZERO.match(node.value):
        digits = node.value.replace("_", "")
        problems.append(
            Problem(
                file,
                node.start_mark.line + 1,
                f"the number {clip(node.value)} has a leading zero, which YAML 1.1 reads as "
                f"octal and YAML 1.2 as decimal: write {clip(str(int(digits, 10)))}, or "
                f"quote it ('{clip(node.value)}') for text",
            )
        )
        return UNREADABLE
    loader = _ScalarLoader.instance
    try:
        return _Loader.construct_object(loader, node, deep=True)  # type: ignore[arg-type]
    except Exception:  # PyYAML's constructors raise anything on a bad explicit tag:
        # `=`, `!tag x`, `!!int abc`, `!!int ''`, `!!timestamp x`: a value no policy key takes
        # (and a number of more than 4,300 digits, past what Python converts).
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        size = f" ({len(node.value):,} characters)" if len(node.value) > ECHO_LIMIT else ""
        problems.append(
            Problem(
                file,
                node.start_mark.line + 1,
                f"cannot read the value {clip(node.value)!r}{size} as {tag}",
            )
        )
        return UNREADABLE
    finally:  # the shared loader caches every node it built: forget them (hot reloads add up)
        loader.constructed_objects.pop(node, None)
        loader.recursive_objects.pop(node, None)


class _ScalarLoader:
    """A throwaway loader instance, used only to construct scalar values."""

    instance: _Loader = _Loader("")


def parse_yaml(text: str, file: str) -> tuple[Any, list[Problem]]:
    """Parse one YAML document into LMap/LList/scalars; syntax errors become Problems."""
    problems: list[Problem] = []
    opened: list[Any] = []  # the parser's marks of the collections open where it stops
    try:
        loader = _Loader(text)
        opened = loader.marks
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        return None, [_syntax_error(exc, file, opened)]
    except yaml.reader.ReaderError as exc:  # a control character: place it by its position
        line = text.count("\n", 0, exc.position) + 1
        return None, [
            Problem(file, line, f"character #x{exc.character:04x} is not allowed in YAML")
        ]
    except yaml.YAMLError as exc:  # composer errors without marks, e.g. several documents
        return None, [Problem(file, 1, f"YAML error: {exc}")]
    except _TooBig as exc:  # nested too deep (see _Loader.compose_node)
        return None, [Problem(file, exc.problem_line, exc.message)]
    except RecursionError:  # a backstop: compose_node refuses long before this
        return None, [Problem(file, 1, f"nested more than {MAX_DEPTH} levels deep")]
    if node is None:
        return None, []
    try:
        document = _construct(node, file, problems, [0])
        if isinstance(node, yaml.ScalarNode) and document is not None:
            document = LScalar(document, file, node.start_mark.line + 1)
        return document, problems
    except _TooBig as exc:
        message = exc.message
        if exc.values and loader.aliases:
            message += " once its YAML aliases (*name) are expanded"
        return None, [Problem(file, exc.problem_line, message)]


# Spaces YAML does not take for one: pasted from a web page or a chat, `mode:\u00a0shadow` is
# one plain scalar, and PyYAML's error, lines later, says nothing of the character.
_LOOKALIKE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000\ufeff]")


def _lookalike_space(mark: Any, first: int, last: int) -> str:
    """' (line N holds a NO-BREAK SPACE, U+00A0, …)' for the first such space on lines
    `first`..`last` (1-based) of the text `mark` points into, else ''."""
    buffer = getattr(mark, "buffer", None)
    if not buffer:
        return ""
    lines = buffer.split("\n")
    if lines[0].startswith("\ufeff"):  # a byte order mark opening the file is no mistake
        lines[0] = lines[0][1:]
    for number in range(max(first, 1), min(last, len(lines)) + 1):
        if found := lookalike_space(lines[number - 1]):
            return f" (line {number} holds {found})"
    return ""


def lookalike_space(text: str) -> str:
    """'the character NO-BREAK SPACE, U+00A0, where YAML needs a plain space' for the first
    such space in `text`, else ''."""
    if not (found := _LOOKALIKE_SPACES.search(text)):
        return ""
    char = found.group()
    name = unicodedata.name(char, "a space character")
    return f"the character {name}, U+{ord(char):04X}, where YAML needs a plain space"


def _opener(mark: Any) -> str:
    """The character at `mark` ('{', '[', a quote…), or '' if unknown."""
    buffer = getattr(mark, "buffer", None)
    return buffer[mark.pointer] if buffer is not None and mark.pointer < len(buffer) else ""


def _at_end(mark: Any) -> bool:
    """Whether `mark` is where the text ends (PyYAML's buffer ends in a NUL)."""
    buffer = getattr(mark, "buffer", None)
    return buffer is not None and not buffer[mark.pointer :].strip("\0")


def _syntax_error(exc: yaml.MarkedYAMLError, file: str, opened: list[Any]) -> Problem:
    """PyYAML's error, at the line to fix. It notices an unclosed `{`, `[` or quote, or a key
    without its ':', only where the next construct begins, often lines later: the line that
    opened it is named, with where the parser stopped."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else 1
    at_end = _at_end(mark)
    if at_end and mark.column == 0 and line > 1:
        line -= 1  # the end of a file ending in a newline: its last line, not one past it
    problem = exc.problem or "invalid YAML"
    context = exc.context or ""
    start, what = None, ""
    if context.startswith("while parsing a flow"):
        # The innermost flow collection still open (a "flow node" context marks the node).
        start = next((m for m in reversed(opened) if _opener(m) in ("{", "[")), exc.context_mark)
        what = {"{": "unclosed flow mapping '{'", "[": "unclosed flow sequence '['"}.get(
            _opener(start), "unclosed flow collection"
        )
    elif context == "while scanning a quoted scalar":
        start = exc.context_mark
        what = f"unclosed quoted text (its {_opener(start)} is never closed)"
    elif context == "while scanning a simple key":
        start, what = exc.context_mark, "a line with neither 'key: value' nor '- item'"
    if start is not None and (start.line + 1 != line or at_end):
        stopped = "at the end of the file" if at_end else f"at line {line}"
        problem += f" {stopped}{_lookalike_space(mark, start.line + 1, line)}"
        return Problem(file, start.line + 1, f"YAML syntax error: {what}: {problem}")
    # The line before too: a key spelled `kind:\u00a0a` reads as text, and the error comes
    # where the next key starts. Found, it is the cause: the guesses below are not.
    if odd := _lookalike_space(mark, line - 1, line):
        problem += odd
    elif problem.startswith("expected <block end>"):
        problem = (
            f"this line is probably mis-indented: it lines up with no key or item above it "
            f"({problem})"
        )
    elif problem == "mapping values are not allowed here":
        problem += " (a value holding ': ' must be quoted, or this line is mis-indented)"
    elif "cannot start any token" in problem and "\\t" in problem:
        problem += " (indent with spaces, not tabs)"
    elif problem == "but found another document":
        problem = "a policy file holds one YAML document, and a second one starts here"
    return Problem(file, line, f"YAML syntax error: {problem}")


def policy_files(path: Path) -> list[Path]:
    """A policy is one YAML file or every *.yaml / *.yml in a folder, in name order (hidden
    files left out: editors keep their own copies beside the one being edited). The extension's
    case does not matter: a `BUDGETS.YAML` left out would silently take its budgets with it,
    and this listing is also what the running proxy watches for edits. A broken link
    or a folder by such a name is listed too, to be reported: skipped, its budgets would
    silently be gone. Raises OSError when the folder cannot be listed."""
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in (".yaml", ".yml") and not p.name.startswith(".")
        )
    return [path]


_NOT_A_FILE = {
    stat.S_IFIFO: "a named pipe (FIFO), not a file",
    stat.S_IFCHR: "a device, not a file",
    stat.S_IFBLK: "a device, not a file",
    stat.S_IFSOCK: "a socket, not a file",
}


def read_policy_file(path: Path, *, pipe: bool = False) -> bytes:
    """A policy file's bytes; raises OSError naming what is wrong. Opened without blocking and
    checked to be a regular file before reading: a named pipe (`mkfifo budgets.yaml`) would
    hang the reading thread until something wrote to it, the watcher silently ignoring every
    later edit and the proxy unable to exit. `pipe`: a command that reads the policy once
    takes one (`drawdown check <(git show HEAD:policy.yaml)`, `/dev/stdin`)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory")
        if pipe and stat.S_ISFIFO(mode):
            os.set_blocking(descriptor, True)
        elif not stat.S_ISREG(mode):
            raise OSError(0, _NOT_A_FILE.get(stat.S_IFMT(mode), "not a regular file"))
        return file.read()


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:  # is_symlink raises on a folder that cannot be searched
        return False


def read_documents(
    path: Path, *, pipe: bool = False
) -> tuple[list[tuple[str, Any]], list[bytes], list[Problem]]:
    """Read and parse every file of a policy once; returns (file, document) pairs, each
    document's bytes as read (what the policy's digest is made of) and problems. `pipe`: the
    path may be a pipe read once (read_policy_file), not a folder's file."""
    problems: list[Problem] = []
    documents: list[tuple[str, Any]] = []
    texts: list[bytes] = []
    # Line 0 below means "no line": the path itself could not be read as a policy file (it is
    # missing, a link to nothing, a folder, unreadable), so there is no text to point into.
    try:
        path.stat()  # a parent folder that cannot be searched raises here, not only ENOENT
        files = policy_files(path)
    except FileNotFoundError:
        if _is_link(path):
            return [], [], [Problem(str(path), 0, "a link to nothing", link_to_nothing=True)]
        return [], [], [Problem(str(path), 0, "no such file or folder")]
    except OSError as exc:  # PermissionError, a loop of links…: a policy error, never a traceback
        return [], [], [Problem(str(path), 0, f"cannot read: {exc.strerror or exc}")]
    if not files:
        return [], [], [Problem(str(path), 0, "folder holds no *.yaml policy files")]
    for file in files:
        name = str(file)
        try:
            raw = read_policy_file(file, pipe=pipe and file == path)
        except OSError as exc:
            broken = isinstance(exc, FileNotFoundError) and _is_link(file)
            reason = "a link to nothing" if broken else exc.strerror or str(exc)
            problems.append(Problem(name, 0, f"cannot read: {reason}", link_to_nothing=broken))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            problems.append(
                Problem(name, line, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            )
            continue
        document, found = parse_yaml(text, name)
        problems.extend(found)
        if document is not None:
            documents.append((name, document))
            texts.append(raw)
        elif not found:
            # An editor saving in place truncates the file first: a hot reload that took the
            # empty file for a policy with no budgets would stop enforcing everything.
            problems.append(Problem(name, 1, "the file holds no policy (empty, or only comments)"))
    return documents, texts, problems
