"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from outbox.api.database import DatabaseWatch

router = APIRouter()

#: How long /readyz waits for the database before answering 503.
READY_TIMEOUT = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (no dependencies checked)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {
            "description": "The database is unreachable (`database`: `unreachable`) or "
            "misconfigured (`misconfigured`: no such database or role, or a schema that "
            "is not at head); `reason` says what to do."
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    """The database answers within two seconds and its schema is at head."""
    watch: DatabaseWatch = request.app.state.database
    problem = await watch.check(READY_TIMEOUT)
    if problem is None:
        return JSONResponse({"status": "ready", "database": "ok"})
    return JSONResponse(
        {
            "status": "unavailable",
            "database": "unreachable" if problem.retryable else "misconfigured",
            "reason": str(problem),
        },
        status_code=503,
        headers={"Retry-After": "1" if problem.retryable else "10"},
    )
