"""`GET /metrics`: Prometheus' text exposition of the deployment's figures."""

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Jobs by kind and status, queue depths, job durations, live workers and their memory
    (for the whole deployment), and this gateway's HTTP requests."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
