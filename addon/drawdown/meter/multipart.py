"""multipart/form-data bodies (the Images API's edits, audio transcriptions): text fields and
uploaded parts. The boundary is read from the body's first line; where the request's
Content-Type is given (not in replay's recorded bodies), it must name the same one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .types import MeterRequestError

# A transcription or an image edit has a few dozen parts at most (an edit's 16 images, a
# diarization's 4 speakers); each part is read in Python.
MAX_PARTS = 1000


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    # (part name, content) of each upload, in order.
    uploads: list[tuple[str, bytes]] = field(default_factory=list)
    # Names given to more than one part (a list's `name[]`, or a field a host takes once).
    repeated: set[str] = field(default_factory=set)
    # Every value of each text field, in order (`fields` keeps the last): a list's items.
    lists: dict[str, list[str]] = field(default_factory=dict)

    def upload(self, name: str) -> bytes | None:
        """The content of the first upload named `name`, or None."""
        return next((content for part, content in self.uploads if part == name), None)


def boundary_of(content_type: str | None) -> str | None:
    """The `boundary` parameter of a multipart Content-Type header, or None.
    MeterRequestError when it names more than one (or two headers were joined): a host could
    read the form by either."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "multipart/form-data":
        return None
    found = {
        m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(";" + params)
        if m.group(1).lower() == "boundary"
    }
    if len(found) > 1 or "," in _QUOTED.sub("", params):  # a comma outside quotes: joined
        raise MeterRequestError("the request's Content-Type names more than one boundary")
    return next(iter(found), None)


def parse_form(
    body: bytes, upload_names: frozenset[str] = frozenset(), boundary: str | None = None
) -> Form:
    """The fields and uploads of a multipart form. A part is an upload when it carries a
    filename or its name is in `upload_names`; every other part is a UTF-8 text field.

    The boundary is read from the body's delimiter line; whitespace before it and bare-LF line
    ends are tolerated. `boundary`: the one the request's Content-Type names, which the body
    must use (a host reads the parts of that one only). MeterRequestError for a form that
    cannot be read.
    """
    start = body.find(b"--")
    eol = body.find(b"\n", start) if start >= 0 else -1
    if start < 0 or eol < 0 or body[:start].strip(b"\r\n\t "):
        raise MeterRequestError("the multipart form does not start with a boundary line")
    delimiter = body[start:eol].rstrip(b" \t\r")  # RFC 2046 allows padding after it
    if not 3 <= len(delimiter) <= 72:  # "--" and 1 to 70 characters
        raise MeterRequestError("the multipart form's boundary line is malformed")
    if boundary is not None and delimiter != b"--" + boundary.encode("utf-8", "replace"):
        # A host would take the parts read here as a preamble and read others: the meter
        # must see what the host sees.
        raise MeterRequestError(
            "the multipart form's boundary is not the one its Content-Type names"
        )
    parts = body[eol + 1 :].split(b"\n" + delimiter, MAX_PARTS + 1)
    if len(parts) > MAX_PARTS + 1:  # each part is read in Python: a bound on the work
        raise MeterRequestError(f"the multipart form has more than {MAX_PARTS} parts")
    if len(parts) < 2 or not parts[-1].startswith(b"--"):
        raise MeterRequestError("the multipart form is cut short (no closing boundary)")
    form = Form()
    names: set[str] = set()
    for i, part in enumerate(parts[:-1]):
        if i > 0:  # the rest of the delimiter line: its line end
            part = part.lstrip(b" \t")
            if not part.startswith((b"\r\n", b"\n")):
                raise MeterRequestError("the multipart form has a malformed boundary line")
            part = part[2:] if part.startswith(b"\r\n") else part[1:]
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = part.partition(b"\n\n")
        if not sep:
            raise MeterRequestError(f"multipart part {i + 1} has no header block")
        if content.endswith(b"\r"):  # the CR of the CRLF before the next delimiter
            content = content[:-1]
        name, filename = _disposition(head, i)
        if name in names:
            form.repeated.add(name)
        names.add(name)
        if filename is not None or name in upload_names:
            form.uploads.append((name, content))
            continue
        try:
            form.fields[name] = content.decode("utf-8")
        except UnicodeDecodeError:
            raise MeterRequestError(f"multipart field {name!r} is not valid UTF-8") from None
        form.lists.setdefault(name, []).append(form.fields[name])
    return form


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def _disposition(head: bytes, i: int) -> tuple[str, str | None]:
    """(name, filename or None) from a part's Content-Disposition header."""
    for line in head.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        params = {
            m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _PARAM.finditer(value)
        }
        if "name" in params:
            return params["name"], params.get("filename")
    raise MeterRequestError(f"multipart part {i + 1} has no Content-Disposition name")


def form_int(fields: dict[str, str], key: str) -> int | None:
    """An optional non-negative integer field of a form."""
    value = fields.get(key)
    if value is None or not value.strip():
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise MeterRequestError(f"{key} must be an integer, not {value[:20]!r}") from None
    if number < 0:
        raise MeterRequestError(f"{key} must be a non-negative integer, not {number}")
    return number


def form_bool(fields: dict[str, str], key: str) -> bool:
    """An optional true/false field of a form (absent: false)."""
    value = fields.get(key, "").strip().lower()
    if value not in ("", "true", "false"):
        raise MeterRequestError(f"{key} must be true or false, not {value[:20]!r}")
    return value == "true"
