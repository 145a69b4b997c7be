"""``outbox``: the single entry point for running and operating the product."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import args as types
from dispatcher.settings import load_settings, require_database_url


def cmd_migrate(ns: argparse.Namespace) -> int:
    """Upgrade the schema to the newest revision."""
    from cli import migrate
    from dispatcher.db import redact

    url = require_database_url(load_settings())
    migrate.upgrade_or_exit(url, "outbox migrate")
    print(f"schema is at head on {redact(url)}")
    return 0


def cmd_api(ns: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    from dispatcher import logs

    logs.configure()
    require_database_url(load_settings())  # fail here, naming the setting, not in each worker
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=ns.host,
        port=ns.port,
        workers=ns.workers,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    parser = argparse.ArgumentParser(
        prog="outbox",
        description="Transactional email outbox: registration API, dispatcher and operations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from cli import dev, run_dispatcher

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
    migrate.set_defaults(handler=cmd_migrate)

    from cli import audit

    audit.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``outbox`` command line."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        code: int = ns.handler(ns)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
