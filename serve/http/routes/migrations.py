"""Model migration over HTTP: start one (a job like any, followed at GET /jobs/{id}), switch back, free
the old vectors. The same as ``mmembed migrate``. No ``from __future__ import annotations``: FastAPI
reads these signatures' types."""

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mmembed.contracts import JobStarted, MigrationRefused
from mmembed.serve.http.errors import ApiError, migration_running
from mmembed.serve.http.schemas import MigrateRequest
from mmembed.serve.http.service import Api, get_api, job_accepted
from mmembed.store.switching import MigrationError, MigrationRunning

router = APIRouter()
ApiDep = Annotated[Api, Depends(get_api)]


@router.post("/migrations", status_code=202)
async def start_migration(body: MigrateRequest, request: Request, api: ApiDep) -> JSONResponse:
    """Computes the new model's vectors for every item from its stored object while searches answer from
    the old ones, then switches the default vectors; poll GET /jobs/{id} (its counts say whether it switched)."""
    if body.to not in api.served:
        raise ApiError(422, "model_not_found", f"model {body.to!r} is not served here; served: {api.served}")
    await api.open_catalog()
    started = await api.backend.start_migration(body.to, body.from_, body.accept_failed)
    match started:
        case MigrationRefused(message):
            raise ApiError(409, "migration_refused", message, {"Retry-After": str(api.config.retry_after_s)})
        case JobStarted(job_id):
            return job_accepted(request, job_id)
    raise TypeError(f"not a migration start outcome: {started!r}")


@router.post("/migrations/rollback")
async def rollback(api: ApiDep) -> JSONResponse:
    """Switches the default vectors back to what the last switch replaced (again: forward)."""
    try:
        return JSONResponse(asdict(await api.backend.rollback()))
    except MigrationRunning as exc:
        raise migration_running(exc, api.config.retry_after_s) from exc
    except MigrationError as exc:
        raise ApiError(409, "nothing_to_switch", str(exc)) from exc


@router.post("/migrations/drop-old")
async def drop_old(api: ApiDep) -> JSONResponse:
    """Frees the vectors the last switch replaced; a rollback is no longer possible."""
    try:
        return JSONResponse({"dropped": await api.backend.drop_old()})
    except MigrationRunning as exc:
        raise migration_running(exc, api.config.retry_after_s) from exc
    except MigrationError as exc:
        raise ApiError(409, "nothing_to_drop", str(exc)) from exc
