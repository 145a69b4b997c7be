"""``outbox``: the single entry point for running and operating the product."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from outbox.cli import args as types
from outbox.cli import output
from outbox.dispatcher import startup
from outbox.dispatcher.settings import load_settings, require_database_url


def cmd_migrate(ns: argparse.Namespace) -> int:
    """Upgrade the schema to the newest revision."""
    from outbox.cli import migrate
    from outbox.dispatcher.db import redact

    url = require_database_url(load_settings())
    startup.check_or_exit(url, "migrate", schema=False)  # the server, role and database
    registration = not ns.without_registration
    migrate.upgrade_or_exit(url, "outbox migrate", registration=registration)
    print(f"schema is at head on {redact(url)}")
    return 0


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_api(ns: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn; exit 0 after a graceful stop (SIGTERM, SIGINT)."""
    from outbox.cli import extras

    extras.require("api", {"api": None})
    import uvicorn

    from outbox.cli.ports import listen_problem
    from outbox.dispatcher import logs

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format or "json")
    require_database_url(settings)  # fail here, naming the setting, not in each worker
    from outbox.api.welcome import TemplateProblem, load_templates

    try:
        load_templates(settings)  # the same: a broken template is one line, exit 2
    except TemplateProblem as exc:
        print(f"outbox api: {exc}", file=sys.stderr)
        return 2
    problem = listen_problem(ns.host, ns.port)
    if problem is not None:
        print(f"outbox api: {problem}", file=sys.stderr)
        return 2
    # After a graceful shutdown uvicorn raises the signal that stopped it again, for the
    # handler that was in place before it: by default status 143 (SIGTERM) or a
    # KeyboardInterrupt (SIGINT). A requested stop is a success, and so is a signal that
    # arrives before uvicorn took over its signals: either way, exit 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)
    uvicorn.run(
        "outbox.api.app:create_app",
        factory=True,
        host=ns.host,
        port=ns.port,
        workers=ns.workers,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    return 0


def build_parser() -> types.Parser:
    """The full command-line parser."""
    parser = types.Parser(
        prog="outbox",
        description="Transactional email outbox: registration API, dispatcher and operations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from outbox.cli import dev, run_dispatcher

    dev.register(sub)
    run_dispatcher.register(sub)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    api.add_argument("--port", type=types.port, default=8000, help="TCP port (default 8000)")
    api.add_argument(
        "--workers", type=types.positive_int, default=1, help="worker processes (default 1)"
    )
    api.set_defaults(handler=cmd_api)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to head")
    migrate.add_argument(
        "--without-registration",
        action="store_true",
        help="install the outbox without the registration service's tables (users, "
        "registration_keys), next to an application's own; kept by later migrations",
    )
    migrate.set_defaults(handler=cmd_migrate)

    from outbox.cli import audit, policy

    audit.register(sub)
    policy.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``outbox`` command line."""
    output.guard()
    try:
        ns = build_parser().parse(argv)
        code: int = ns.handler(ns)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except output.OutputClosed:
        return output.closed()
    return code


if __name__ == "__main__":
    sys.exit(main())
