"""The app's own tables, as SQLAlchemy ORM models.

They share the database with the outbox's tables (installed by ``outbox migrate
--without-registration``, which leaves out the outbox's own ``users``), and know nothing of
them. A real app would create them with Alembic migrations of its own, whose history
(``alembic_version``) lives next to the outbox's (``outbox_alembic_version``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, LargeBinary, String, func
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    """Someone who signed up."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    display_name: Mapped[str] = mapped_column(String(100))
    signed_up_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


# One account per address, whatever its letter case.
Index("users_email_ci_key", func.lower(User.email), unique=True)


class PasswordReset(Base):
    """A password-reset link that was mailed: only the SHA-256 of its token is kept."""

    __tablename__ = "password_resets"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


async def create_tables(engine: AsyncEngine) -> None:
    """Create the app's tables (those missing)."""
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
