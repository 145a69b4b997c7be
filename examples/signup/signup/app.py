"""The app's HTTP endpoints (FastAPI): sign up, and ask for a password-reset link.

Run it with ``uvicorn --factory signup.app:create_app`` (see the README). ``DATABASE_URL``
says where the database is, ``APP_URL`` where the app is reached (for the reset link).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from signup import accounts


def engine_url(url: str) -> str:
    """SQLAlchemy's URL for the asyncpg driver (the outbox's enqueue needs it)."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+asyncpg"
    return f"{scheme}{sep}{rest}"


class SignUpIn(BaseModel):
    email: str = Field(max_length=320)
    display_name: str = Field(min_length=1, max_length=100)


class SignUpOut(BaseModel):
    id: int
    email: str
    display_name: str
    #: The welcome mail in the outbox (the first one, on a repeat).
    welcome_mail_id: int
    message_id: str


class ResetIn(BaseModel):
    email: str = Field(max_length=320)


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(request.app.state.engine, expire_on_commit=False) as session:
        yield session


Session = Annotated[AsyncSession, Depends(_session)]


def create_app(database_url: str | None = None, app_url: str | None = None) -> FastAPI:
    """The app, on ``database_url`` (default ``DATABASE_URL``)."""
    url = engine_url(database_url or os.environ["DATABASE_URL"])
    base = (app_url or os.environ.get("APP_URL") or "http://127.0.0.1:8001").rstrip("/")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = create_async_engine(url)
        try:
            yield
        finally:
            await app.state.engine.dispose()

    app = FastAPI(title="Signup example", lifespan=lifespan)

    @app.post("/signup", status_code=201)
    async def signup(body: SignUpIn, session: Session, response: Response) -> SignUpOut:
        """Create the account and queue its welcome mail, in one transaction. Signing up
        again with the address answers 200 with the same account and the same mail."""
        for attempt in range(2):
            try:
                async with session.begin():
                    done = await accounts.sign_up(session, body.email, body.display_name)
                break
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            except IntegrityError:
                if attempt:  # someone else signed up with this address at the same moment
                    raise
        if not done.created:
            response.status_code = 200
        return SignUpOut(
            id=done.user.id,
            email=done.user.email,
            display_name=done.user.display_name,
            welcome_mail_id=done.welcome.id,
            message_id=done.welcome.message_id,
        )

    @app.post("/password-reset", status_code=202)
    async def password_reset(body: ResetIn, session: Session) -> dict[str, str]:
        """Mail a reset link to the account with this address, if there is one (the
        answer is the same either way, so it tells nobody who has an account)."""
        async with session.begin():
            await accounts.request_password_reset(session, body.email, f"{base}/reset-password")
        return {"detail": "if an account has this address, a reset link is on its way"}

    @app.get("/reset-password")
    async def check_reset(token: str, session: Session) -> dict[str, str]:
        """Where the link leads: whether the token is good (a real app shows a form)."""
        user = await accounts.valid_reset(session, token)
        if user is None:
            raise HTTPException(404, "this link is unknown, used or expired")
        return {"email": user.email}

    return app
