"""Settings shared by every process, read from the environment (flags override them)."""

from __future__ import annotations

import sys
from email.headerregistry import Address
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

SmtpSecurity = Literal["none", "starttls", "tls"]


def check_dispatcher_name(name: str) -> str:
    """``name`` if it can name a dispatcher (``DISPATCHER_NAME``, ``--name``), else ValueError.

    1 to 100 characters of plain text: it is shown by ``outbox status`` and in every log
    line, and goes to PostgreSQL as the connections' application_name.
    """
    from outbox.dispatcher.addresses import plain_text

    return plain_text(name, "a dispatcher name", longest=100)


class Settings(BaseSettings):
    """Every environment setting the product reads, with its default."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, frozen=True)

    database_url: str | None = Field(
        default=None,
        description="postgresql:// or postgresql+asyncpg:// URL; `outbox dev` starts an "
        "embedded PostgreSQL when unset.",
    )
    smtp_host: str | None = None
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    # Declared before smtp_security, whose check reads it (and smtp_username).
    smtp_allow_insecure_auth: bool = Field(
        default=False,
        description="Allow AUTH over an unencrypted connection (SMTP_SECURITY=none), "
        "for a local relay only.",
    )
    smtp_security: SmtpSecurity = "none"
    smtp_timeout: float = Field(default=30.0, gt=0, le=600)
    smtp_ca_file: str | None = Field(
        default=None, description="Extra CA bundle for verifying the SMTP server's certificate."
    )
    mail_from: str = "Outbox <noreply@example.com>"
    admin_token: SecretStr | None = None
    # The welcome mail (api/welcome.py): its templates and the values they are given.
    product_name: str = Field(
        default="Outbox",
        min_length=1,
        max_length=100,
        description="The product's name in the welcome mail (plain text: it goes into "
        "the subject).",
    )
    app_url: str | None = Field(
        default=None,
        description="http:// or https:// URL of the application, linked from the welcome "
        "mail; unset, the mail has no link.",
    )
    templates_dir: Path | None = Field(
        default=None,
        description="Folder whose welcome.subject.txt, welcome.txt and welcome.html "
        "replace the shipped templates of the same name.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Least severe log level written (any letter case)."
    )
    log_format: Literal["json", "console"] | None = Field(
        default=None,
        description="json (one object per line), or console (readable lines); "
        "unset means console under `outbox dev`, json everywhere else.",
    )

    # Dispatcher tuning (flags of `outbox dispatcher` override these).
    dispatcher_name: str | None = Field(default=None, min_length=1, max_length=100)
    dispatcher_concurrency: int = Field(default=8, ge=1, le=1000)
    dispatcher_batch_size: int = Field(default=32, ge=1, le=10000)
    dispatcher_poll_interval: float = Field(default=2.0, gt=0, le=3600)
    dispatcher_lease: float = Field(default=120.0, ge=1, le=86400)
    dispatcher_heartbeat_interval: float = Field(default=2.0, gt=0, le=60)
    dispatcher_max_attempts: int = Field(default=15, ge=1, le=1000)
    dispatcher_max_age: float = Field(default=3 * 86400, gt=0)
    dispatcher_max_abandons: int = Field(default=5, ge=1, le=1000)
    dispatcher_retry_base: float = Field(default=5.0, gt=0)
    dispatcher_retry_cap: float = Field(default=1800.0, gt=0)
    dispatcher_grace: float = Field(default=20.0, ge=0, le=3600)
    dispatcher_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        from outbox.dispatcher.startup import check_url

        check_url(value)  # raises ValueError with a readable message
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("smtp_security")
    @classmethod
    def _check_auth_is_encrypted(cls, value: SmtpSecurity, info: ValidationInfo) -> SmtpSecurity:
        # aiosmtplib logs in whenever a username is set: over "none" that is the password
        # in the clear (AUTH PLAIN and LOGIN are base64), readable on every hop.
        if (
            value == "none"
            and info.data.get("smtp_username") is not None
            and not info.data.get("smtp_allow_insecure_auth", False)
        ):
            raise PydanticCustomError(
                "insecure_auth",
                "AUTH would send SMTP_PASSWORD in cleartext; use starttls or tls, "
                "or set SMTP_ALLOW_INSECURE_AUTH=true for a local relay",
            )
        return value

    @field_validator("mail_from")
    @classmethod
    def _check_mail_from(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("dispatcher_name")
    @classmethod
    def _check_dispatcher_name(cls, value: str | None) -> str | None:
        return None if value is None else check_dispatcher_name(value)

    @field_validator("product_name", mode="before")
    @classmethod
    def _strip_product_name(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @field_validator("product_name")
    @classmethod
    def _check_product_name(cls, value: str) -> str:
        from outbox.dispatcher.addresses import unsafe_text

        reason = unsafe_text(value)  # it goes into the Subject header
        if reason is not None:
            raise ValueError(reason)
        return value

    @field_validator("app_url")
    @classmethod
    def _check_app_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        check_app_url(value.strip())
        return value.strip()

    @field_validator("templates_dir", mode="before")
    @classmethod
    def _empty_templates_dir(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters long")
        return value

    @property
    def resolved_smtp_port(self) -> int:
        """The SMTP port, defaulting by security mode (25, 587 for STARTTLS, 465 for TLS)."""
        if self.smtp_port is not None:
            return self.smtp_port
        return {"none": 25, "starttls": 587, "tls": 465}[self.smtp_security]

    @property
    def sender(self) -> Address:
        """MAIL_FROM as a structured address."""
        return parse_address(self.mail_from)


def parse_address(value: str) -> Address:
    """Parse ``"Name <user@host>"`` or ``user@host`` into an :class:`Address`.

    Raises ValueError on anything that is not exactly one plain address.
    """
    from email.headerregistry import HeaderRegistry

    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    try:
        header = HeaderRegistry()("To", value)
    except Exception:  # the parser trips over some malformed input (e.g. "user@")
        raise ValueError(f"{value!r} is not a single valid email address") from None
    addresses: tuple[Address, ...] = getattr(header, "addresses", ())
    defects: tuple[object, ...] = getattr(header, "defects", ())
    if len(addresses) != 1 or defects or not addresses[0].domain:
        raise ValueError(f"{value!r} is not a single valid email address")
    return addresses[0]


def check_app_url(value: str) -> None:
    """Raise ValueError unless ``value`` is an absolute http(s) URL fit to put in a mail."""
    if len(value) > 2000:
        raise ValueError("must be at most 2000 characters long")
    if not all("!" <= ch <= "~" for ch in value):
        raise ValueError(
            "must be printable ASCII without spaces (an internationalised domain as "
            "xn--..., anything else percent-encoded), e.g. https://app.example.com"
        )
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(
            "must start with http:// or https:// (e.g. https://app.example.com), "
            f"got scheme {parts.scheme or '(none)'!r}"
        )
    try:
        _ = parts.port  # ValueError for a port that is not a number or out of range
    except ValueError:
        raise ValueError("has an invalid port") from None
    if not parts.hostname:
        raise ValueError("must name a host, e.g. https://app.example.com")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password (it is sent to every user)")


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, or exit naming the bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix
            lines.append(f"invalid setting {name}: {message}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def require_database_url(settings: Settings) -> str:
    """DATABASE_URL, or exit (code 2) with a message naming the setting."""
    if settings.database_url is None:
        print(
            "invalid setting DATABASE_URL: not set (e.g. postgresql://user@host/db)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return settings.database_url
