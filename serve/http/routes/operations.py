"""What operators and probes ask: the models served, liveness, readiness and Prometheus
metrics. No ``from __future__ import annotations``: FastAPI reads these signatures' types."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from mmembed.serve.http.service import Api, get_api

router = APIRouter()
ApiDep = Annotated[Api, Depends(get_api)]


@router.get("/models")
async def models(api: ApiDep) -> dict[str, Any]:
    """Each model's encoders, and where its replicas run: on a cluster, which node holds which."""
    replicas = await api.backend.replicas()
    out = []
    for spec in api.config.models:
        placement = [
            {"replica": r.replica_id, "state": r.state, "node_id": r.node_id, "node_ip": r.node_ip}
            for r in replicas
            if r.model == spec.name
        ]
        info = await api.describe(spec.name)
        for modality, enc in info.encoders.items():
            out.append(
                {
                    "model": spec.name,
                    "name": enc.name,
                    "modality": modality,
                    "dim": enc.dim,
                    "limits": {k: v for k, v in enc.limits.items() if v is not None},
                    "device": info.device,
                    "version": info.version,
                    "replicas": {"min": spec.min_replicas, "max": spec.max_replicas},
                    "placement": placement,
                }
            )
    return {"data": out}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(api: ApiDep) -> JSONResponse:
    try:
        await asyncio.wait_for(asyncio.gather(*(api.describe(m) for m in api.served)), timeout=5)
    except Exception as exc:  # any model not answering (or timing out) means not ready
        return JSONResponse({"status": "not_ready", "reason": f"{type(exc).__name__}: {exc}"}, 503)
    return JSONResponse({"status": "ready", "models": sorted(api.served)})


@router.get("/metrics")
async def metrics(api: ApiDep) -> PlainTextResponse:
    body = api.metrics.exposition(await api.backend.list_jobs())
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
