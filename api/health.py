"""Liveness and readiness probes."""

from __future__ import annotations

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dispatcher.db import CONNECTION_ERRORS

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database is unreachable."}})
async def readyz(request: Request) -> JSONResponse:
    """The database answers a query within two seconds."""
    pool: asyncpg.Pool = request.app.state.pool
    try:
        async with pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)
    except CONNECTION_ERRORS:
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ready", "database": "ok"})
