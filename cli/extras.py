"""The optional parts of the package (pip extras), and one line saying which is missing.

``pip install mail-outbox`` is the library, ``outbox migrate``, ``outbox dispatcher`` and
the audit commands. The registration service (``outbox api``) needs the ``api`` extra;
``outbox dev`` also starts an embedded PostgreSQL and a mail sink, from the ``local``
extra (each only when ``DATABASE_URL`` or ``SMTP_HOST`` does not point elsewhere).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Final

#: The distribution's name on the package index.
DISTRIBUTION: Final = "mail-outbox"

#: The modules each extra brings (as ``pyproject.toml`` lists them).
MODULES: Final = {
    "api": ("fastapi", "fastapi_offline", "uvicorn", "jinja2", "email_validator"),
    "local": ("pgserver", "aiosmtpd"),
}


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of ``extra`` (or just ``modules`` of it) that cannot be imported."""
    names = MODULES[extra] if modules is None else modules
    return [name for name in names if importlib.util.find_spec(name) is None]


def require(command: str, needs: dict[str, tuple[str, ...] | None]) -> None:
    """Exit 2 with one line naming the extras to install when a module of one is missing.

    ``needs`` maps each extra to the modules of it the command uses (None: all of them).
    """
    absent = {extra: missing(extra, modules) for extra, modules in needs.items()}
    extras = [extra for extra, names in absent.items() if names]
    if not extras:
        return
    names = ", ".join(name for extra in extras for name in absent[extra])
    plural = "extras" if len(extras) > 1 else "extra"
    print(
        f"outbox {command}: needs the {' and '.join(extras)} {plural} ({names} not installed): "
        f"pip install '{DISTRIBUTION}[{','.join(extras)}]'",
        file=sys.stderr,
    )
    raise SystemExit(2)
