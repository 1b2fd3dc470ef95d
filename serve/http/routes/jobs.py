"""Bulk jobs over HTTP: start one, follow it, read its dead letters. No ``from __future__
import annotations``: FastAPI reads these signatures' types."""

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mmembed.contracts import JobStarted, MigrationRefused, PathForbidden, TooManyJobs
from mmembed.serve.http.errors import ApiError
from mmembed.serve.http.schemas import IngestRequest
from mmembed.serve.http.service import Api, get_api, job_accepted

router = APIRouter()
ApiDep = Annotated[Api, Depends(get_api)]


@router.post("/ingest", status_code=202)
async def ingest(body: IngestRequest, request: Request, api: ApiDep) -> JSONResponse:
    """Starts a bulk job in the background; poll GET /jobs/{id}. The same source and models
    are the same job: posting it again while it runs answers the running one."""
    served = api.served
    unknown = sorted(set(body.models or []) - set(served))
    if unknown:
        raise ApiError(422, "model_not_found", f"models not served here: {unknown}; served: {served}")
    await api.open_catalog()
    started = await api.backend.start_job(body.source, body.models or served, body.sync or body.watch, body.watch)
    match started:
        case PathForbidden(message):
            raise ApiError(403, "path_forbidden", message)
        case TooManyJobs(running):
            message = f"{running} bulk jobs are running; the limit is MMEMBED_MAX_CONCURRENT_JOBS"
            raise ApiError(429, "too_many_jobs", message, {"Retry-After": "30"})
        case MigrationRefused(message):
            raise ApiError(409, "migration_running", message, {"Retry-After": str(api.config.retry_after_s)})
        case JobStarted(job_id):
            return job_accepted(request, job_id)
    raise TypeError(f"not a job start outcome: {started!r}")


@router.get("/jobs")
async def list_jobs(api: ApiDep) -> JSONResponse:
    return JSONResponse({"data": [asdict(job) for job in await api.backend.list_jobs()]})


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, api: ApiDep) -> JSONResponse:
    job = await api.backend.job(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return JSONResponse(asdict(job))


@router.delete("/jobs/{job_id}")
async def stop_job(job_id: str, api: ApiDep) -> JSONResponse:
    """Stops a watching job (POST /ingest with watch) once its round in progress ends."""
    if await api.backend.job(job_id) is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    if not await api.backend.stop_job(job_id):
        raise ApiError(409, "job_not_watching", f"job {job_id!r} is not watching its source: nothing to stop")
    return JSONResponse({"id": job_id, "stopping": True}, 202)


@router.get("/jobs/{job_id}/dead-letters")
async def get_dead_letters(job_id: str, api: ApiDep) -> JSONResponse:
    """The job's items that failed past their retries, with the reason (`mmembed dlq list` on the server)."""
    if await api.backend.job(job_id) is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return JSONResponse({"data": [asdict(letter) for letter in await api.backend.dead_letters(job_id)]})
