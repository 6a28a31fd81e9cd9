# Sourced by the other scripts: find a Python >= 3.12, create or reuse .venv,
# install the project (and its test extras) when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DRAWDOWN_VENV:-$ROOT/.venv}"

py_ok() {  # is "$1" an interpreter of Python >= 3.12?
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in "${DRAWDOWN_PYTHON:-}" python3.13 python3.12 python3.14; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate" && { command -v "$candidate"; return; }
  done
  # pyenv keeps its interpreters out of PATH unless a shim selects them.
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for candidate in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
    py_ok "$candidate/bin/python" && { echo "$candidate/bin/python"; return; }
  done
  for candidate in /usr/local/bin/python3 /usr/bin/python3 python3; do
    command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate" && { command -v "$candidate"; return; }
  done
  echo "drawdown needs Python >= 3.12 (mitmproxy 12). Install python3.12 or python3.13, or set DRAWDOWN_PYTHON=/path/to/python." >&2
  return 1
}

ensure_venv() {  # $1: pip extras, e.g. "test"
  local extras="${1:-}"
  if [ ! -x "$VENV/bin/python" ] || ! py_ok "$VENV/bin/python"; then
    local py; py="$(find_python)"
    echo "drawdown: creating $VENV with $("$py" --version)" >&2
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  # The stamp is the pyproject's hash and the extras installed with it: a script that wants
  # fewer extras than are there (./scripts/run after ./scripts/test) installs nothing.
  local stamp="$VENV/.drawdown-installed" sha had="" extra missing=""
  sha="$(sha1sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  local stamped; stamped="$(cat "$stamp" 2>/dev/null || true)"
  if [ "${stamped%%+*}" = "$sha" ]; then had="${stamped#*+}"; fi
  for extra in ${extras//,/ }; do
    case ",$had," in *",$extra,"*) ;; *) missing=1 ;; esac
  done
  if [ "${stamped%%+*}" != "$sha" ] || [ -n "$missing" ]; then
    echo "drawdown: installing the project into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    local all="$extras"; [ -n "$had" ] && all="$had${extras:+,$extras}"
    local spec="$ROOT"; [ -n "$all" ] && spec="$ROOT[$all]"
    "$VENV/bin/python" -m pip install --quiet -e "$spec" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$sha+$all" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

ensure_node_agent() {  # the e2e tests' Node agent (tests/agents/node), where npm is
  local dir="$ROOT/tests/agents/node" sha
  command -v npm >/dev/null 2>&1 || return 0  # its test skips (fails under DRAWDOWN_REQUIRE_NODE)
  sha="$(sha1sum < "$dir/package-lock.json" | cut -d' ' -f1)"
  [ "$(cat "$dir/node_modules/.drawdown-installed" 2>/dev/null || true)" = "$sha" ] && return 0
  echo "drawdown: installing the Node test agent into $dir/node_modules" >&2
  if (cd "$dir" && npm ci --no-audit --no-fund --silent >/dev/null); then
    echo "$sha" > "$dir/node_modules/.drawdown-installed"
  else
    echo "drawdown: npm ci failed in $dir: the Node agent's test cannot run" >&2
  fi
}
