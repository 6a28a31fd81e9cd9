"""`drawdown` — run | env | check | explain | report | budgets | demo (SPEC §8)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from mitmproxy.version import VERSION as MITMPROXY

from . import __version__
from .escape import printable
from .eventloop import EventLoop
from .ledger.dsn import DEFAULT_DB, is_postgres

if TYPE_CHECKING:
    from mitmproxy import options

    from .policy.model import Policy

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_CONFDIR = "~/.drawdown"
CA_CERT = "mitmproxy-ca-cert.pem"  # as cacerts names it; not imported, for a quick --help


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"wants a whole number of at least 1, got {text!r}")
    return value


def ledger_url(text: str) -> str:
    """`--db`: a path, `sqlite:///PATH` or `postgresql://…`; any other `scheme://` is a typo
    (`sqlite://x.db`, `postgresq://…`) that would otherwise become a folder named after it."""
    scheme, sep, rest = text.partition("://")
    if not text.strip():
        raise argparse.ArgumentTypeError("wants a path, sqlite:///PATH or postgresql://…")
    if sep and not (
        (scheme == "sqlite" and rest.startswith("/"))
        or (scheme in ("postgresql", "postgres") and rest)
    ):
        from .ledger.dsn import redact_dsn  # a mistyped scheme holds the password all the same

        raise argparse.ArgumentTypeError(
            "wants a path, sqlite:///PATH (three slashes) or postgresql://HOST/DB, "
            f"got {redact_dsn(text)!r}"
        )
    return text


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not sep or bare_ipv6 or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(
            f"--listen wants HOST:PORT, e.g. {DEFAULT_LISTEN} (an IPv6 address in brackets: "
            f"[::1]:8080); got {text!r}"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


# --- run ------------------------------------------------------------------------------------


class Announce:
    """Prints the one line scripts and tests wait for, once the proxy accepts connections."""

    def running(self) -> None:
        from mitmproxy import ctx

        for host, port, *_ in ctx.master.addons.get("proxyserver").listen_addrs():
            shown = f"[{host}]" if ":" in host else host
            print(f"drawdown listening on http://{shown}:{port}", flush=True)
            break


def cmd_run(args: argparse.Namespace) -> int:
    from .addon import _loopback
    from .policy import PolicyInvalid, load_policy

    host, port = parse_listen(args.listen)
    sets = list(args.set or [])
    _check_sets(sets)
    try:
        load_policy(args.policy)  # fail fast with FILE:LINE messages before starting anything
    except PolicyInvalid as exc:
        print(f"drawdown: invalid policy, not starting:\n{exc}", file=sys.stderr)
        return 1
    auth = next(
        (
            s.split("=", 1)[1].strip()
            for s in reversed(sets)
            if s.split("=", 1)[0].strip() == "proxyauth" and "=" in s
        ),
        "",
    )
    if not _loopback(host):
        # `any` takes every user name and password: anyone who reaches the proxy could claim any
        # agent's identity and spend its budget, which is what this refusal is for.
        if not auth or auth == "any":
            raise UsageError(
                f"refusing to listen on {host} without proxy authentication"
                f"{' (proxyauth=any accepts anyone)' if auth == 'any' else ''}: add --set "
                "proxyauth=@/path/to/htpasswd (or listen on 127.0.0.1)"
            )
        if auth.startswith("@") and not Path(auth[1:]).expanduser().is_file():
            raise UsageError(f"proxyauth names no credentials file: {auth[1:]}")
    cpus = _cpus_for_workers(args)
    from .workers import REUSE_PORT_ENV

    if os.environ.get(REUSE_PORT_ENV):  # a worker shares its supervisor's port and CA
        return _serve(args, host, port, sets, cpus)
    _refuse_an_address_it_cannot_listen_on(host, port)
    passphrase = _set_value(sets, "cert_passphrase")
    with _ready_ca(Path(args.confdir).expanduser().absolute(), passphrase) as confdir:
        args.confdir = str(confdir)  # mitmproxy's, and the workers': maybe a private copy
        return _serve(args, host, port, sets, cpus)


def _serve(
    args: argparse.Namespace, host: str, port: int, sets: list[str], cpus: list[int] | None
) -> int:
    if args.workers > 1:
        from .workers import supervise

        problem = asyncio.run(_check_sets_for_workers(sets), loop_factory=EventLoop)
        if problem:
            print(f"drawdown: {problem}", file=sys.stderr)
            return 1
        confdir = Path(args.confdir).expanduser()
        return supervise(_worker_args(args), args.workers, host, port, str(confdir), cpus)
    if cpus:
        from .affinity import pin_process, writer_environment

        # A worker's writer CPUs were set by its supervisor, who knows the other workers.
        for name, value in writer_environment(cpus[0], cpus).items():
            os.environ.setdefault(name, value)
        pin_process(cpus[0])  # before mitmproxy starts a thread: each inherits the CPU
    return asyncio.run(_run_proxy(args, host, port, sets), loop_factory=EventLoop)


# Options `run` sets from its own flags, after which a `--set` would silently win: the CA made
# in one confdir while mitmproxy used another, the ledger opened at one path and then another.
_SET_BY_FLAGS = {
    "listen_host": "--listen HOST:PORT",
    "listen_port": "--listen HOST:PORT",
    "confdir": "--confdir DIR",
    "drawdown_policy": "--policy PATH",
    "drawdown_db": "--db PATH",
    "drawdown_mode": "--mode",
}


def _set_value(sets: list[str], name: str) -> str | None:
    """The value the last `--set NAME=VALUE` gives NAME, as mitmproxy takes it."""
    found = None
    for item in sets:
        key, sep, value = item.partition("=")
        if sep and key.strip() == name:
            found = value
    return found


def _check_sets(sets: list[str]) -> None:
    """No `--set` for what a flag of `run` sets, and none without a name. A bare NAME keeps
    mitmproxy's meaning (a switch turned on, another option unset)."""
    for entry in sets:
        name = entry.partition("=")[0].strip()
        if name in _SET_BY_FLAGS:
            raise UsageError(f"--set {name} would override {_SET_BY_FLAGS[name]}: use that")
        if not name:
            raise UsageError(f"--set wants NAME=VALUE (or NAME, for a switch), got {entry!r}")


@contextlib.contextmanager
def _ready_ca(confdir: Path, passphrase: str | None = None) -> Iterator[Path]:
    """The CA, loaded or minted, the agents' bundle refreshed with it, and the confdir
    mitmproxy loads it from: this one, or a private copy of a read-only one (a Kubernetes
    Secret), removed when the proxy stops.

    `run` calls it once, before any worker starts: N workers on a fresh confdir would each mint
    their own, and clients would trust only the last written; and a CA minted or replaced
    there is then the one `drawdown env` points agents at."""
    from .cacerts import BundleUnwritable, CAUnusable, ensure_ca, loadable_confdir, write_bundle

    with contextlib.ExitStack() as stack:
        try:
            ca = ensure_ca(confdir, passphrase)
            try:
                write_bundle(confdir, ca)
            except BundleUnwritable as exc:
                # The proxy needs no bundle: a stale one must not stop it, and `env` makes
                # each agent its own from the CA's certificate.
                print(
                    f"drawdown: warning: {exc}; the proxy runs without it, and `drawdown env` "
                    "writes each agent's own (in the user's cache, or --bundle-dir DIR)",
                    file=sys.stderr,
                )
            loadable = stack.enter_context(loadable_confdir(confdir))
        except CAUnusable as exc:
            raise UsageError(str(exc)) from None
        yield loadable


def _refuse_an_address_it_cannot_listen_on(host: str, port: int) -> None:
    """Say so in drawdown's terms before mitmproxy does in its own (`[Errno None] … could not
    bind on any address`; its hint for a port in use names an option drawdown does not take).
    Binding as the proxy will, then letting go: a port taken in the instant between still
    fails, with mitmproxy's message."""
    import errno
    import socket

    where = f"{url_host(host)}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise UsageError(
            f"cannot listen on {where}: {host} cannot be resolved to an address; "
            "check the host in --listen HOST:PORT"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"{where} is already in use (another drawdown run?); "
                    "choose another with --listen HOST:PORT, or :0 for a free port"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"cannot listen on {where}: {host} is not an address of this machine; "
                    "choose one of its own with --listen HOST:PORT (0.0.0.0 for all of them)"
                ) from None


def _checked_choices(opts: options.Options, sets: list[str]) -> list[str]:
    """`sets` with each value of an option that lists its values (`termlog_verbosity`,
    `tls_version_*`) spelled as listed, in any case (`termlog_verbosity=WARN` worked before this
    check). mitmproxy lists them but takes any: `termlog_verbosity=bogus` reached the logging
    module, a traceback at startup."""
    from mitmproxy import exceptions

    known = dict(opts.items())
    checked = []
    for entry in sets:
        name, sep, value = entry.partition("=")  # as mitmproxy splits it
        choices = known[name].choices if sep and name in known else None
        if choices:  # else mitmproxy's own message, or no list to check against
            listed = {choice.lower(): choice for choice in choices}
            if value.lower() not in listed:
                raise exceptions.OptionsError(
                    f"{name} must be one of {', '.join(choices)}, not {value!r}"
                )
            entry = f"{name}={listed[value.lower()]}"
        checked.append(entry)
    return checked


def _refuse_unknown_options(opts: options.Options, sets: list[str]) -> None:
    """A `--set` naming no option of the proxy, said with the nearest name. mitmproxy's
    "Unknown option(s): flow_detial" came after the ledger was opened, with exit status 1."""
    known = list(opts.keys())
    for entry in sets:
        name = entry.partition("=")[0]
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"--set {name}: no such option{hint}")


async def _check_sets_for_workers(sets: list[str]) -> str | None:
    """In the supervisor, before any worker starts: --set against the options each worker will
    have, so that a mistake is said once rather than by every worker, each then stopped. A
    value an option does not list is returned, for the status a worker would give it."""
    from mitmproxy import exceptions, options

    from .addon import Drawdown
    from .master import DrawdownMaster

    opts = options.Options()
    DrawdownMaster(opts, tail=[Drawdown()])  # built for its options only: nothing is started
    _refuse_unknown_options(opts, sets)
    try:
        _checked_choices(opts, sets)
    except exceptions.OptionsError as exc:
        return str(exc)
    return None


def _cpus_for_workers(args: argparse.Namespace) -> list[int] | None:
    """--cpu-affinity, checked against this machine: one CPU per worker, or None."""
    if args.cpu_affinity is None:
        return None
    from .affinity import AffinityError, supported, worker_cpus

    if not supported():
        raise UsageError("--cpu-affinity needs Linux (sched_setaffinity and /proc)")
    try:
        return worker_cpus(args.cpu_affinity, max(1, args.workers), os.sched_getaffinity(0))
    except AffinityError as exc:
        raise UsageError(str(exc)) from None


def _worker_args(args: argparse.Namespace) -> list[str]:
    """A worker's command line: this one's, without --workers and --listen (the supervisor sets it)."""
    out = ["--policy", args.policy, "--db", args.db, "--confdir", args.confdir]
    if args.mode:
        out += ["--mode", args.mode]
    for item in args.set or []:
        out += ["--set", item]
    return out


async def _run_proxy(args: argparse.Namespace, host: str, port: int, sets: list[str]) -> int:
    from mitmproxy import exceptions, options

    from .addon import Drawdown
    from .affinity import WriterPlacement, format_cpus
    from .master import DrawdownMaster
    from .workers import (
        REUSE_PORT_ENV,
        STOP_NOW,
        enable_reuse_port,
        exit_with_supervisor,
        stop_signals,
    )

    supervisor = os.environ.get(REUSE_PORT_ENV)
    if supervisor:
        enable_reuse_port()
        if supervisor.isdigit():
            exit_with_supervisor(int(supervisor))
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("hpack", "asyncio", "passlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    confdir = str(Path(args.confdir).expanduser())  # made ready, with its CA, by cmd_run
    opts = options.Options(listen_host=host, listen_port=port, confdir=confdir)
    # Add the addons first, then set their options, so that their `configure` sees every value.
    drawdown = Drawdown()
    master = DrawdownMaster(opts, tail=[drawdown, Announce()])
    # lazy: nothing is opened upstream before drawdown has decided on the request itself, so a
    # denied call never so much as connects to its destination (override with --set). rawtcp:
    # the addon turns it off in any case (Drawdown.configure says why); off from the start, it
    # needs no word in the log.
    opts.update(connection_strategy="lazy", rawtcp=False)
    # mitmproxy undoes a refused update by configuring the addons again with the options as
    # they were (no policy yet), and that second refusal would replace the real one: keep the first.
    refusals: list[Exception] = []

    def refused(exc: Exception) -> None:
        refusals.append(exc)

    opts.errored.connect(refused)
    _refuse_unknown_options(opts, sets)
    try:
        opts.update(drawdown_policy=args.policy, drawdown_db=args.db, drawdown_mode=args.mode or "")
        if sets:
            opts.set(*_checked_choices(opts, sets))
    except exceptions.OptionsError as exc:
        print(f"drawdown: {refusals[0] if refusals else exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        await drawdown.drain()
        master.shutdown()

    def on_stop_signal() -> None:
        # The first signal lets the calls in flight finish (drawdown_drain); a second one, from
        # a user who will not wait, stops at once. A worker hears that from its supervisor
        # alone (STOP_NOW): a service manager may signal it directly too, on the same stop.
        if stopping and not supervisor:
            master.shutdown()
        elif not stopping:
            stopping.append(loop.create_task(drain_then_stop()))

    for sig in stop_signals():
        loop.add_signal_handler(sig, on_stop_signal)
    if supervisor:
        loop.add_signal_handler(STOP_NOW, master.shutdown)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.cpu_affinity is not None:
        placement = WriterPlacement.from_environment()
        logging.getLogger("drawdown").info(
            "drawdown: pinned to CPU %s (event loop and ledger writer%s)",
            format_cpus(os.sched_getaffinity(0)),
            f"; under load the writer spreads to CPU {format_cpus(placement.spread)}"
            if placement
            else "",
        )
    await master.run()
    errors = master.addons.get("errorcheck")
    return 1 if errors and errors.logger.has_errored else 0


# --- env ------------------------------------------------------------------------------------


def agent_environment(proxy_url: str, bundle: Path) -> dict[str, str]:
    """The variables `drawdown env` exports (the JVM's aside): an agent's HTTP stacks read the
    proxy and the CA bundle from them. Lower-case names too: Python's and curl's stacks read
    `https_proxy` before `HTTPS_PROXY`, so a value the shell had there would win."""
    ca = str(bundle)
    return {
        "HTTPS_PROXY": proxy_url,
        "HTTP_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "http_proxy": proxy_url,
        "SSL_CERT_FILE": ca,
        "REQUESTS_CA_BUNDLE": ca,
        "NODE_EXTRA_CA_CERTS": ca,
        # curl reads CURL_CA_BUNDLE before SSL_CERT_FILE: a value preset there would win.
        "CURL_CA_BUNDLE": ca,
        # boto3 / botocore (Bedrock) ignore SSL_CERT_FILE and read AWS_CA_BUNDLE before
        # REQUESTS_CA_BUNDLE: a value preset there (or `ca_bundle` in ~/.aws/config) would win.
        "AWS_CA_BUNDLE": ca,
        # Node's fetch (the openai and anthropic TypeScript SDKs) ignores HTTPS_PROXY unless
        # this is set (Node 22.21+, 24.5+); older Node ignores it.
        "NODE_USE_ENV_PROXY": "1",
    }


def cmd_env(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    if not port:  # `run` chooses it when it binds; an agent pointed at port 0 reaches nothing
        raise UsageError(
            f"--listen {args.listen}: port 0 means a free port, chosen when `drawdown run` "
            "starts; give `env` the port `run` printed (drawdown listening on http://HOST:PORT)"
        )
    for flag, article in (("agent", "an"), ("run", "a")):
        value = getattr(args, flag)
        if value is not None and not value.strip():  # `--agent ""`: not "no agent in the URL"
            raise UsageError(f"--{flag} wants {article} {flag} id; got an empty one")
    if args.run and not args.agent:
        # The run travels as the proxy password, which needs a user name beside it.
        raise UsageError("--run needs --agent: the run id is sent as the proxy password")
    policy = _load_policy_or_none(args.policy)
    if policy is False:
        return 2
    bundle = _agent_bundle(args)
    credentials = ""
    if args.agent:
        from urllib.parse import quote

        credentials = quote(args.agent, safe="") + ":" + quote(args.run or "", safe="") + "@"
    host = _connectable(host)
    url = f"http://{credentials}{url_host(host)}:{port}"
    for name, value in agent_environment(url, bundle).items():
        print(f"export {name}={_shell_quote(value)}")
    _warn_of_no_proxy(os.environ, cast("Policy | None", policy))  # False returned above
    from .cacerts import TRUSTSTORE

    _java_options(host, port, bundle.parent / TRUSTSTORE)
    return 0


def _warn_of_no_proxy(environ: Mapping[str, str], policy: Policy | None = None) -> None:
    """`drawdown env` leaves NO_PROXY as it is (the agent's own services stay direct), but an
    entry there that covers a provider's host (`*`, or `.amazonaws.com` in an AWS base image)
    sends the agent's calls to it around the proxy: unseen, unbudgeted, without a word. With
    `--policy`, the hosts its actions name are checked too (a tool's `deny` goes unchecked)."""
    from .bypass import actions_exempted, entries_and_ports, exempted

    named: dict[str, list[str]] = {}  # value -> the variables holding it
    for name in ("no_proxy", "NO_PROXY"):
        if value := environ.get(name, ""):
            named.setdefault(value, []).append(name)
    for value, names in named.items():
        by_entry: dict[str, dict[str, str]] = {}  # entry -> host pattern -> how it is named
        for entry, pattern in exempted(value):
            by_entry.setdefault(entry, {})[pattern] = pattern
        of_actions = actions_exempted(value, policy) if policy else []
        for entry, pattern, label in of_actions:
            if entry != "*":
                by_entry.setdefault(entry, {})[pattern] = label
        if not by_entry:
            continue
        order = [entry for entry, _ in entries_and_ports(value)]  # as the value names them
        by_entry = dict(sorted(by_entry.items(), key=lambda item: order.index(item[0])))
        everything = "every host" if policy else "every provider"
        covered = "; ".join(
            f"{entry} covers " + (everything if entry == "*" else ", ".join(labels.values()))
            for entry, labels in by_entry.items()
        )
        sends = "send" if len(names) > 1 else "sends"
        hosts = "hosts" if policy and of_actions else "providers"
        print(
            f"drawdown: {' and '.join(names)} here {sends} calls to these {hosts} around the "
            f"proxy, unseen and unbudgeted: {printable(covered)}. Take those entries out of "
            f"{printable(value)}, or `unset no_proxy NO_PROXY`",
            file=sys.stderr,
        )


def _agent_bundle(args: argparse.Namespace) -> Path:
    """The agents' bundle (absolute: the agent that evals the exports may start elsewhere).
    The CA's certificate is read, from --ca-cert or the confdir, and never made: a CA made
    here would be one no proxy uses. The bundle goes to --bundle-dir; else beside the
    certificate in the confdir, or, when that folder refuses it (a read-only mount) or the
    certificate came with --ca-cert, to a folder of the user's cache for that CA."""
    from .cacerts import BundleUnwritable, CAUnusable, agent_ca, cache_folder, write_bundle

    confdir = Path(args.confdir).expanduser().absolute()
    ca_cert = Path(args.ca_cert).expanduser().absolute() if args.ca_cert else None
    try:
        ca = agent_ca(confdir, ca_cert)
        if args.bundle_dir:
            folder = Path(args.bundle_dir).expanduser().absolute()
        elif ca_cert:
            folder = cache_folder(ca)
        else:
            try:
                return write_bundle(confdir, ca)
            except BundleUnwritable as exc:
                folder = cache_folder(ca)
                print(
                    f"drawdown: {confdir} cannot take the agents' CA bundle ({exc.reason}); "
                    f"it is written to {folder} instead (--bundle-dir DIR to choose)",
                    file=sys.stderr,
                )
        try:
            return write_bundle(folder, ca)
        except BundleUnwritable as exc:
            raise CAUnusable(f"{exc}: give --bundle-dir a folder this user can write") from None
    except CAUnusable as exc:
        raise UsageError(str(exc)) from None


def _connectable(host: str) -> str:
    """The host an agent connects to for a proxy listening on `host`. 0.0.0.0 and :: mean
    "every address": a proxy listens there so agents on other hosts reach it, but no agent can
    connect to them. This machine's name serves those agents and this host alike; 127.0.0.1
    only when the machine knows itself by no other name than localhost."""
    import ipaddress
    import socket

    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return host
    if not unspecified:
        return host
    # getfqdn() is the name DNS gives this host; where /etc/hosts maps the host name to a
    # loopback address it answers `localhost`, and the bare host name is the better guess.
    names = (socket.getfqdn(), socket.gethostname())
    name = next((n for n in names if n and n.split(".")[0] != "localhost"), "127.0.0.1")
    print(
        f"drawdown: {url_host(host)} is every address of this machine, which no agent can "
        f"connect to; the proxy URL names {name} instead (to name another, give --listen the "
        "HOST:PORT your agents reach)",
        file=sys.stderr,
    )
    return name


def _java_options(host: str, port: int, truststore: Path) -> None:
    """JVM agents (HttpClient, HttpURLConnection, OkHttp: the openai-java, LangChain4j and
    Spring AI clients) read no HTTPS_PROXY and no PEM bundle, but every JVM reads
    JAVA_TOOL_OPTIONS: the proxy and the truststore go there, after what the agent's shell
    already set. The JVM splits that variable on whitespace, so a path with a space, or a
    character the double quotes below would expand, cannot be carried."""
    if any(c.isspace() or c in "\"$`\\'" for c in str(truststore)):
        print(
            f"drawdown: JVM agents not configured: JAVA_TOOL_OPTIONS cannot carry {truststore} "
            "(a space or a quote in it); choose a --confdir without one",
            file=sys.stderr,
        )
        return
    properties = [
        *(
            f"-D{scheme}.proxyHost={host} -D{scheme}.proxyPort={port}"
            for scheme in ("https", "http")
        ),
        f"-Djavax.net.ssl.trustStore={truststore} -Djavax.net.ssl.trustStoreType=PKCS12",
    ]
    options = " ".join(properties)
    print(f'export JAVA_TOOL_OPTIONS="${{JAVA_TOOL_OPTIONS:+$JAVA_TOOL_OPTIONS }}{options}"')


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _terminal(text: str) -> str:
    """Text for a terminal: model names, paths and reasons come from agents' requests, so any
    control character (an escape sequence, a fake line) is shown escaped, never interpreted."""
    # Nearly every line needs nothing, and isprintable() checks one in C: escaping each
    # character in Python took 1.27 s over a 26 MB report, this 0.12 s.
    return "\n".join(line if line.isprintable() else _escaped(line) for line in text.split("\n"))


_escaped = printable  # a line with a control character in it


# --- check / explain ------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .policy import PolicyInvalid, load_policy

    status = 0
    for path in args.paths:
        try:
            policy = load_policy(path, once=True)
        except PolicyInvalid as exc:
            for problem in exc.problems:
                print(problem)
            status = 1
            continue
        for warning in policy.warnings:  # valid, so exit 0, but likely not what was meant
            print(warning)
        print(
            f"{path}: ok — mode {policy.mode}, {len(policy.actions)} action(s), {len(policy.budgets)} budget(s)"
            # The digest its decisions carry, as a report names the policy it judged by.
            f" from {len(policy.files)} file(s), policy {policy.digest[:16]}"
        )
    return status


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain
    from .policy import PolicyInvalid, load_policy

    try:
        policy = load_policy(args.policy, once=True)
    except PolicyInvalid as exc:
        print(exc, file=sys.stderr)
        return 1
    for warning in policy.warnings:  # as `check` prints them: the decision may be why
        print(warning, file=sys.stderr)
    headers: list[tuple[str, str]] = []
    for item in args.header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header wants NAME:VALUE, got {item!r}")
        if any(c in item for c in "\r\n\0"):  # a request could not carry it: two headers, or none
            raise UsageError(f"--header holds a line break or NUL, which no header can: {item!r}")
        headers.append((name.strip(), value.strip()))
    if args.method is not None and not _is_token(args.method):
        raise UsageError(
            "--method wants an HTTP method such as GET or POST (letters, digits and "
            f"{_TOKEN_SYMBOLS}), got {args.method!r}"
        )
    _check_url(args.url)
    body = args.json.encode() if args.json is not None else b""
    if args.json is not None:
        try:
            json.loads(args.json)
        except ValueError as exc:
            raise UsageError(f"--json is not valid JSON: {exc}") from None
    kinds = [name for name, given in (("--json", args.json is not None),
             ("--data", args.data is not None), ("--form/--file", args.form or args.file)) if given]  # fmt: skip
    if len(kinds) > 1:
        many = "two" if len(kinds) == 2 else "three"
        raise UsageError(
            f"{', '.join(kinds[:-1])} and {kinds[-1]} are {many} kinds of body: give one"
        )
    if args.form or args.file:
        content_type, body = _multipart_body(args.form or [], args.file or [])
        headers.append(("Content-Type", content_type))
    if args.data is not None:  # as curl -d: form-encoded, unless a --header says otherwise
        body = args.data.encode()
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
    from .ledger.api import LedgerError

    try:
        result = explain(
            policy,
            url=args.url,
            method=args.method,
            headers=headers,
            body=body,
            proxy_user=args.proxy_user,
            proxy_password=args.proxy_password,
            proxyauth=args.proxyauth,
            client_ip=args.client_ip,
            db=args.db,
        )
    except LedgerError as exc:  # --db names no ledger, or one it cannot read
        print(f"drawdown: {exc}", file=sys.stderr)
        return 1
    if args.as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(_terminal(result.text()))
    return 0


def _multipart_body(fields: list[str], files: list[str]) -> tuple[str, bytes]:
    """(Content-Type, body) of the multipart form --form and --file describe."""
    import secrets

    boundary = "drawdown-" + secrets.token_hex(12)
    out = bytearray()
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--form wants NAME=VALUE, got {item!r}")
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for item in files:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--file wants NAME=PATH, got {item!r}")
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"--file {name}: cannot read {path}: {exc.strerror}") from None
        filename = Path(path).name.replace('"', "")
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '.encode()
        out += f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


_TOKEN_SYMBOLS = "!#$%&'*+-.^_`|~"


def _is_token(text: str) -> bool:
    """An HTTP method is a token (RFC 9110 §5.6.2): ASCII letters, digits and _TOKEN_SYMBOLS."""
    return bool(text) and all(c.isascii() and (c.isalnum() or c in _TOKEN_SYMBOLS) for c in text)


def _check_url(text: str) -> None:
    """What a proxy would see: an http(s) URL with a host (the scheme may be left out)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text if "://" in text else f"https://{text}")
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise UsageError(f"--url is not a URL ({exc}): {text!r}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"--url wants an http:// or https:// URL, got {text!r}")
    if not parts.hostname:
        raise UsageError(f"--url names no host: {text!r}")
    if any(c.isspace() or not c.isprintable() for c in parts.hostname):
        raise UsageError(f"--url's host holds a space or control character: {text!r}")


# --- report ---------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from .ledger.api import LedgerError
    from .ledger.dsn import redact_dsn
    from .ledger.integrity import summary, verify
    from .ledger.reader import Reader

    try:
        reader = Reader(args.db)
        try:
            problems = verify(reader, settled=args.settled)
            counts = summary(reader)
        finally:
            reader.close()
    except LedgerError as exc:
        print(f"drawdown: {exc}", file=sys.stderr)
        return 1
    if args.as_json:
        print(json.dumps({"ok": not problems, "problems": problems, **counts}, indent=2))
    else:
        holds = (
            ", ".join(f"{n} {state}" for state, n in sorted(counts["holds"].items())) or "no holds"
        )
        print(f"{redact_dsn(args.db)}: {counts['decisions']} decision(s); holds: {holds}")
        for problem in problems:
            print(f"  ✗ {problem}")
        print("ledger invariants hold" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report
    from .ledger.api import LedgerError

    try:
        since = report.parse_duration(args.since) if args.since is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag in ("run", "tenant", "workflow"):
        value = getattr(args, flag)
        if value is not None and not value.strip():  # `--tenant ""`: not "every tenant"
            raise UsageError(f"--{flag} wants a {flag} id; got an empty one")
    if args.html == "":  # `--html ""`: not "no page", the text report
        raise UsageError("--html wants a file to write; got an empty name")
    policy = _load_policy_or_none(args.policy)
    if policy is False:
        return 1
    narrow = {"tenant": args.tenant, "workflow": args.workflow}
    try:
        if args.jsonl:
            written = report.stream_jsonl(args.db, sys.stdout, run=args.run, since=since, **narrow)
            if args.run and not written:
                return _no_such_run(args, since)
            return 0
        data = report.build(
            args.db, run=args.run, since=since, policy=policy, timelines=bool(args.html), **narrow
        )
    except LedgerError as exc:
        print(f"drawdown: {exc}", file=sys.stderr)
        return 1
    if args.html:
        if args.run and not data["runs"]:  # no page of 0 runs, nor over an earlier page
            return _no_such_run(args, since)
        try:
            Path(args.html).write_text(report.render_html(data), encoding="utf-8")
        except OSError as exc:
            print(f"drawdown: cannot write {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(
            f"drawdown: wrote {args.html} ({_count(len(data['runs']), 'run')}, "
            f"{_count(len(data['anomalies']), 'anomaly', 'anomalies')})"
        )
    elif args.as_json:
        print(json.dumps(data, indent=2))
    else:
        print(_terminal(report.render_text(data, every_instance=args.run is not None)))
    if args.run and not data["runs"]:  # a mistyped id must not read as a quiet run
        return _no_such_run(args, since)
    return 0


def _ip_address(text: str) -> str:
    """argparse type: an IPv4 or IPv6 address, as a client's would be."""
    import ipaddress

    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"wants an IP address, such as 10.0.0.7 or fd00::7; got {text!r}"
        ) from None
    # As written: the proxy reads a client's address as the socket gives it (::ffff:10.0.0.7
    # from an IPv4 client of a proxy on ::), which Python 3.12's str() would rewrite.
    return text.strip()


def _no_such_run(args: argparse.Namespace, since: float | None = None) -> int:
    from . import report
    from .ledger.api import LedgerError
    from .ledger.dsn import redact_dsn

    within = f" in the last {args.since}" if args.since else ""
    narrowed = [(flag, getattr(args, flag)) for flag in ("tenant", "workflow")]
    of = ", ".join(f"{flag} {value!r}" for flag, value in narrowed if value is not None)
    try:  # `--run X --tenant Y`: is X another tenant's run, or no run at all?
        elsewhere = bool(of) and report.run_outside(args.db, args.run, since=since)
    except LedgerError:
        elsewhere = False
    if elsewhere:
        print(
            f"drawdown: run {args.run!r} is in {redact_dsn(args.db)}{within}, but not of {of}: "
            "nothing to report",
            file=sys.stderr,
        )
    else:
        # The RUNS table shows scopes: one pasted whole names no run id.
        scope = args.run.startswith("run:") or "/run:" in args.run
        last = args.run.rpartition("run:")[2]
        hint = (
            f"; --run takes the run id, the scope's last part ({last!r})"
            if scope and last and "/" not in last
            else ""
        )
        print(
            f"drawdown: no run {args.run!r} in {redact_dsn(args.db)}{within}{hint}",
            file=sys.stderr,
        )
    return 1


def _load_policy_or_none(path: str | None) -> object:
    """The policy at `path` (None without one); False after printing why it is invalid."""
    if not path:
        return None
    from .policy import PolicyInvalid, load_policy

    try:
        return load_policy(path, once=True)
    except PolicyInvalid as exc:
        print(f"drawdown: invalid policy:\n{exc}", file=sys.stderr)
        return False


# --- replay ---------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from . import replay
    from .ledger.api import LedgerError
    from .report import parse_duration

    try:
        since = parse_duration(args.since) if args.since is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    policy = _load_policy_or_none(args.policy)
    if policy is False:
        return 1
    try:
        data = replay.replay(policy, args.db, since=since)  # type: ignore[arg-type]
    except LedgerError as exc:
        print(f"drawdown: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.as_json else _terminal(replay.render_text(data)))
    return 0


# --- budgets --------------------------------------------------------------------------------


def cmd_budgets(args: argparse.Namespace) -> int:
    """Every budget instance in the ledger: limit, spent and held per unit."""
    from .ledger.api import UNITS, LedgerError
    from .ledger.dsn import redact_dsn
    from .ledger.reader import budget_instances, held_batches
    from .money import exact_usd, format_usd, usd_float
    from .report import iso_time

    try:
        rows = budget_instances(args.db)
        batches = held_batches(args.db)
    except LedgerError as exc:
        print(f"drawdown: {exc}", file=sys.stderr)
        return 1

    def window(row: dict) -> str | None:  # as `drawdown report` writes it: one format to parse
        return iso_time(row["window_start"])

    if args.as_json:
        # instance id -> the batch jobs whose hold covers it: once, not per instance (a fleet's
        # ledger holds tens of thousands of instances)
        batches_on: dict[str, list[dict]] = defaultdict(list)
        for batch in batches:
            for instance_id in (batch["instance_ids"] or "").split(","):
                batches_on[instance_id].append(batch)
        out = []
        for row in rows:
            item: dict = {"budget": row["budget"], "scope": row["scope"], "per": row["per"]}
            item["window_start"] = window(row)
            for key, column in (("limit", "limit"), ("spent", "spent"), ("held", "reserved")):
                item[key] = {u: row[f"{column}_{u}"] for u in UNITS}
                item[key]["usd"] = usd_float(row[f"{column}_usd"])  # display; exact in usd_nanos
                item[key]["usd_nanos"] = row[f"{column}_usd"]
            # Which of `held` is batch jobs', held until their results are read (as the text
            # lists them), so that a monitor does not take it for a stranded hold.
            item["held_for_batches"] = [
                {
                    "key": batch["key"],
                    "scope": batch["scope"],
                    "usd": usd_float(batch["est_usd"]),
                    "usd_nanos": batch["est_usd"],
                    "tokens": batch["est_tokens"],
                    "until": iso_time(batch["expires_at"]),
                }
                for batch in batches_on.get(str(row["id"]), ())
            ]
            out.append(item)
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print(f"no budget instances in {redact_dsn(args.db)} yet")
        return 0

    def cell(row: dict, unit: str) -> str:  # "spent + held / limit"
        # Dollars exactly, as the report writes them: rounded to 4 places, $0.04995 spent of
        # $0.05 read "0.0500 / 0.0500", a budget spent that was not.
        show = exact_usd if unit == "usd" else str
        spent, held, limit = (row[f"{c}_{unit}"] for c in ("spent", "reserved", "limit"))
        if limit is None and not spent and not held:
            return "-"
        text = show(spent) + (f" + {show(held)}" if held else "")
        return text + " / " + (show(limit) if limit is not None else "∞")

    table = [["budget", "scope", "window", "usd", "tokens", "requests"]]
    for row in rows:
        when = f"{row['per']} from {window(row)}" if row["per"] else "lifetime"
        table.append([row["budget"], row["scope"], when, *(cell(row, u) for u in UNITS)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for number, line in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if number == 0:
            print("  ".join("-" * w for w in widths))
    print("(spent + held / limit)")
    if batches:
        # A batch's estimate stays held until its results are read: say which, or the held
        # figures above would look stranded.
        print(f"\nheld for {len(batches)} batch job(s) until their results are read:")
        for batch in batches:
            print(
                f"  {batch['key']}: ${format_usd(batch['est_usd'])}, {batch['est_tokens']} "
                f"tokens, {batch['scope']}, at most until {iso_time(batch['expires_at'])}"
            )
    return 0


# --- prune ----------------------------------------------------------------------------------

# Runs quiet for less are more likely paused than over, and pruning one gives it its guards'
# history back (step_count, loop, requires) should it call again.
PRUNE_FLOOR_SECONDS = 86400


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete the history of runs quiet for longer than --older-than; budgets keep their spend."""
    from .ledger.api import LedgerError
    from .ledger.dsn import redact_dsn
    from .ledger.retention import prune
    from .money import format_usd, usd_float
    from .report import iso_time, parse_duration

    try:
        age = parse_duration(args.older_than, "--older-than", like="1d, 30d or 90d")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if age < PRUNE_FLOOR_SECONDS:
        raise UsageError(
            f"--older-than {args.older_than} is under a day: a run that quiet may only be "
            "paused, and pruning it would give it its guards' history back; give 1d or more"
        )
    before = time.time() - age
    try:
        done = prune(args.db, before, dry_run=args.dry_run)
    except LedgerError as exc:
        print(f"drawdown: {exc}", file=sys.stderr)
        return 1
    if args.as_json:
        out = dataclasses.asdict(done)
        out["before"] = iso_time(done.before)
        nanos = done.carried["usd"]  # as `budgets --json`: a float to show, the exact integer
        out["carried"] = {**done.carried, "usd": usd_float(nanos), "usd_nanos": nanos}
        out["dry_run"] = args.dry_run
        print(json.dumps(out, indent=2))
        return 0
    verb = "would prune" if args.dry_run else "pruned"
    print(
        f"{redact_dsn(args.db)}: {verb} {done.runs} run(s) quiet since {iso_time(done.before)}: "
        f"{done.decisions} decision(s), {done.holds} hold(s), {done.facts} fact(s), "
        f"{done.events} event(s), {done.windows} ended budget window(s)"
    )
    if not args.dry_run and done.holds:
        print(
            f"  their charges stay spent on their budgets (${format_usd(done.carried['usd'])}, "
            f"{done.carried['tokens']} tokens, {done.carried['requests']} requests carried)"
        )
    if done.kept_runs > done.kept_newest:
        batches = done.kept_runs - done.kept_newest
        print(f"  kept {batches} quiet run(s) with a batch job still held")
    if done.kept_newest:  # README's rule: on SQLite, the run of the newest hold stays
        print(
            f"  kept {done.kept_newest} quiet run(s) holding the ledger's newest hold "
            "(SQLite numbers a new hold after it)"
        )
    return 0


# --- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(keep=args.keep)


# --- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drawdown",
        description="Runtime authority for AI agents: a proxy that reserves before and commits after every call.",
    )
    parser.add_argument(
        "--version", action="version", version=f"drawdown {__version__} (mitmproxy {MITMPROXY})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the proxy")
    run.add_argument("--policy", required=True, help="policy file or folder of *.yaml")
    run.add_argument(
        "--db",
        type=ledger_url,
        default=DEFAULT_DB,
        help=f"ledger: PATH, sqlite:///PATH or postgresql://… [{DEFAULT_DB}]",
    )
    run.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT [{DEFAULT_LISTEN}]; port 0 picks a free one",
    )
    run.add_argument(
        "--confdir",
        default=DEFAULT_CONFDIR,
        help=f"where mitmproxy keeps its CA [{DEFAULT_CONFDIR}]",
    )
    run.add_argument("--mode", choices=("enforce", "shadow"), help="override the policy's mode")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="N proxy processes on one address (SO_REUSEPORT) sharing the ledger [1]",
    )
    run.add_argument(
        "--cpu-affinity",
        metavar="CPUS",
        help="pin each worker (its event loop and ledger writer) to one CPU: auto, or a list "
        "such as 0,2-3 (worker i takes the i-th) [the scheduler places them]",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="OPTION=VALUE",
        help="any mitmproxy option (or drawdown_* option) but those run's flags set: "
        "listen_host and listen_port (--listen), confdir (--confdir), drawdown_policy "
        "(--policy), drawdown_db (--db), drawdown_mode (--mode); repeatable",
    )
    run.set_defaults(func=cmd_run)

    env = commands.add_parser("env", help="print the exports an unmodified agent needs")
    source = env.add_mutually_exclusive_group()
    source.add_argument(
        "--confdir",
        default=DEFAULT_CONFDIR,
        help=f"the proxy's confdir, or a folder holding its {CA_CERT} [{DEFAULT_CONFDIR}]",
    )
    source.add_argument(
        "--ca-cert",
        metavar="FILE",
        help=f"the proxy CA's certificate (its confdir's {CA_CERT}), copied to this host",
    )
    env.add_argument(
        "--bundle-dir",
        metavar="DIR",
        help="where to write the agents' CA bundle and Java truststore [the confdir; with "
        "--ca-cert, or when the confdir cannot be written, ~/.cache/drawdown/ca-…]",
    )
    env.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"the HOST:PORT `drawdown run` listens on (the port it printed) [{DEFAULT_LISTEN}]",
    )
    env.add_argument("--agent", help="name the agent in the proxy URL (identity source proxy_user)")
    env.add_argument("--run", help="name the run in the proxy URL (identity source proxy_password)")
    env.add_argument(
        "--policy",
        help="the policy `run` enforces: warn too when NO_PROXY covers a host its actions name",
    )
    env.set_defaults(func=cmd_env)

    check = commands.add_parser("check", help="validate policy files")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(func=cmd_check)

    explain = commands.add_parser(
        "explain", help="how a request would be classified and decided, and why"
    )
    explain.add_argument("--policy", required=True, help="policy file or folder of *.yaml")
    explain.add_argument("--url", required=True, help="the request's URL, as the agent sends it")
    explain.add_argument(
        "--method",
        default=None,
        help="default: POST with a body (--json, --data, --form), else GET",
    )
    explain.add_argument(
        "--header",
        action="append",
        metavar="NAME:VALUE",
        help="a request header; one given twice is read as the proxy reads it: 'first, second'",
    )
    explain.add_argument("--json", metavar="BODY", help="request body (JSON)")
    explain.add_argument(
        "--data",
        metavar="BODY",
        help="a form-encoded request body, as curl -d (Stripe's API: amount=9000&currency=usd)",
    )
    explain.add_argument(
        "--form",
        action="append",
        metavar="NAME=VALUE",
        help="a multipart form field, as curl -F (an audio transcription, an image edit)",
    )
    explain.add_argument(
        "--file",
        action="append",
        metavar="NAME=PATH",
        help="a file uploaded in the multipart form (e.g. file=meeting.mp3)",
    )
    explain.add_argument(
        "--proxy-user", help="as if the agent authenticated to the proxy as this user"
    )
    explain.add_argument(
        "--proxy-password",
        help="as if the agent sent this proxy password (`drawdown env --run`: the run)",
    )
    explain.add_argument(
        "--proxyauth",
        nargs="?",
        const="credentials",
        choices=("credentials", "any"),
        help="as if the proxy ran with proxyauth (credentials, the default, or any): the proxy "
        "user is then the agent; the credentials are assumed valid, none is a 407",
    )
    explain.add_argument(
        "--client-ip",
        type=_ip_address,
        help="as if the request came from this address (identity source client_ip)",
    )
    explain.add_argument(
        "--db", type=ledger_url, help="also show what the ledger holds for the matching budgets"
    )
    explain.add_argument("--as-json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=cmd_explain)

    verify = commands.add_parser(
        "verify", help="check the ledger's invariants (reserved, spent, one decision per request)"
    )
    verify.add_argument(
        "--db",
        type=ledger_url,
        default=DEFAULT_DB,
        help=f"the ledger: PATH, sqlite:///PATH or postgresql://… [{DEFAULT_DB}]",
    )
    verify.add_argument(
        "--settled", action="store_true", help="also require that no hold is still active"
    )
    verify.add_argument("--json", dest="as_json", action="store_true", help="machine-readable")
    verify.set_defaults(func=cmd_verify)

    report = commands.add_parser("report", help="runs, budgets, decisions and anomalies")
    report.add_argument(
        "--db",
        type=ledger_url,
        default=DEFAULT_DB,
        help=f"the ledger: PATH, sqlite:///PATH or postgresql://… [{DEFAULT_DB}]",
    )
    report.add_argument(
        "--run", help="only this run id (as the agent sent it, or as the ledger stores it)"
    )
    report.add_argument("--since", metavar="DURATION", help="e.g. 15m, 24h, 7d")
    report.add_argument(
        "--tenant",
        metavar="ID",
        help="only this tenant's runs, decisions, spend, denials and anomalies, and the budget "
        "instances within it (those it shares with the rest of the fleet marked shared)",
    )
    report.add_argument(
        "--workflow",
        metavar="ID",
        help="only this workflow's, of every tenant with one (with --tenant: that tenant's)",
    )
    output = report.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="one JSON document (a stable contract, for tools)",
    )
    output.add_argument(
        "--jsonl", action="store_true", help="the decision log, one JSON object per decision"
    )
    output.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    report.add_argument(
        "--policy",
        help="judge every run by this policy's anomaly settings [each run by those the proxy "
        "recorded for the policy it ran; the built-in ones where none was recorded]",
    )
    report.set_defaults(func=cmd_report)

    replay = commands.add_parser(
        "replay", help="re-decide the recorded traffic under another policy"
    )
    replay.add_argument("--policy", required=True, help="the policy to replay against")
    replay.add_argument(
        "--db",
        type=ledger_url,
        default=DEFAULT_DB,
        help=f"the ledger: PATH, sqlite:///PATH or postgresql://… [{DEFAULT_DB}]",
    )
    replay.add_argument("--since", metavar="DURATION", help="only traffic this recent, e.g. 7d")
    replay.add_argument("--json", dest="as_json", action="store_true", help="machine-readable")
    replay.set_defaults(func=cmd_replay)

    budgets = commands.add_parser("budgets", help="budget instances: limit, spent and held")
    budgets.add_argument(
        "--db", type=ledger_url, default=DEFAULT_DB, help="PATH, sqlite:///PATH or postgresql://…"
    )
    budgets.add_argument("--json", dest="as_json", action="store_true", help="machine-readable")
    budgets.set_defaults(func=cmd_budgets)

    prune = commands.add_parser(
        "prune", help="delete the history of runs that ended long ago (budgets keep their spend)"
    )
    prune.add_argument(
        "--db",
        type=ledger_url,
        default=DEFAULT_DB,
        help=f"the ledger: PATH, sqlite:///PATH or postgresql://… [{DEFAULT_DB}]",
    )
    prune.add_argument(
        "--older-than",
        metavar="DURATION",
        required=True,
        help="prune runs whose last call is older than this, e.g. 90d (1d at least)",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be pruned; change nothing"
    )
    prune.add_argument("--json", dest="as_json", action="store_true", help="machine-readable")
    prune.set_defaults(func=cmd_prune)

    demo = commands.add_parser(
        "demo", help="the 60-second demo: a runaway agent stopped by its run budget"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's temporary folder")
    demo.set_defaults(func=cmd_demo)
    return parser


# Arguments that name files: POSIX file names are bytes, and Python passes one that is not UTF-8
# on to the OS unchanged, so such a name still finds its file. A PostgreSQL DSN is text.
_FILE_ARGUMENTS = frozenset({"policy", "paths", "confdir", "ca_cert", "bundle_dir", "html", "db"})


def _refuse_undecodable(args: argparse.Namespace) -> None:
    """A UsageError naming the first argument that is not UTF-8 (Python keeps such bytes as
    lone surrogates, which fail later as a traceback or a wrong blame, such as the ledger's)."""
    for dest, value in vars(args).items():
        for each in value if isinstance(value, list) else [value]:
            if not isinstance(each, str) or each.isascii():
                continue
            if dest in _FILE_ARGUMENTS and not is_postgres(each):
                continue
            bad = next((i for i, c in enumerate(each) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is None:
                continue
            # Named, never shown: the value may be a credential (--run is the proxy password).
            name = "PATH" if dest == "paths" else "--" + dest.replace("_", "-")
            at = len(each[:bad].encode("utf-8"))
            code = ord(each[bad])
            byte = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else "a byte"
            raise UsageError(
                f"{name} is not valid UTF-8 ({byte} at offset {at}); "
                "drawdown reads its arguments as UTF-8 text"
            )


# Options whose value may begin with "-". argparse takes `--since -5m` for an option `-5m` and
# answers "expected one argument", so drawdown's own message about durations is never reached.
_VALUES_MAY_START_WITH_A_DASH = frozenset({"--since"})


def _join_dashed_values(argv: list[str]) -> list[str]:
    """`--since -5m` as `--since=-5m`, so the value reaches drawdown's check. A value that is a
    long option (`--since --json`) stays apart: that is a missing value, as argparse says."""
    joined: list[str] = []
    rest = iter(argv)
    for arg in rest:
        if arg == "--":  # everything after it is positional
            joined.append(arg)
            joined.extend(rest)
            break
        following = next(rest, None) if arg in _VALUES_MAY_START_WITH_A_DASH else None
        if following is None:
            joined.append(arg)
        elif following.startswith("-") and not following.startswith("--") and following != "-":
            joined.append(f"{arg}={following}")
        else:
            joined.extend((arg, following))
    return joined


def main(argv: list[str] | None = None) -> int:
    # A file name that is not UTF-8 (taken, see _FILE_ARGUMENTS) is then shown escaped, as
    # stderr shows it, rather than failing as a traceback where the locale makes stdout strict.
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(_join_dashed_values(sys.argv[1:] if argv is None else argv))
    try:
        _refuse_undecodable(args)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"drawdown: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(0)


def _count(n: int, one: str, many: str | None = None) -> str:
    """`1 run`, `2 runs`, `1 anomaly`."""
    return f"{n} {one if n == 1 else many or one + 's'}"
