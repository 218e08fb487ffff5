"""`GET /v1/info`: the model, its placement and every limit a request is checked against
(docs/serving.md §6)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.capabilities import ServiceInfo, current_info
from server.views import ERRORS

router = APIRouter(prefix="/v1")


@router.get(
    "/info",
    response_model=ServiceInfo,
    responses={401: ERRORS[401]},
    summary="Model, device, speed modes and the limits submits are checked against",
)
async def info(request: Request) -> ServiceInfo:
    """The intersection of every live worker's published capabilities and this API's settings: a submit
    within these limits is not refused later for a limit. `workers: 0`: none has published yet; the
    limits are the settings' alone, and prompt tokens are counted by the worker."""
    return await current_info(request.app.state.rt)
