"""`Transport`: requests to the service with the API key attached, error answers raised as
the client's exceptions by kind, and a connection that fails raised as `Unreachable`."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from confprobe_client.errors import Unreachable, api_error

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_VARIABLE = "CONFPROBE_API_KEY"


class Transport:
    """`http` takes an existing client with httpx's interface (an `httpx.Client`, or FastAPI's
    `TestClient` for a service in the same process), which then decides the base URL; else
    one is made from `base_url`, `timeout` (seconds) and an optional httpx `transport`.
    `api_key` (default: the CONFPROBE_API_KEY environment variable) is sent as a bearer
    token with every request."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        api_key: str | None = None,
    ) -> None:
        self._owns_http = http is None
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout, transport=transport)
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE)
        # per request rather than on `http`: a client handed in is not ours to change
        self._auth_headers = {"authorization": f"Bearer {key}"} if key else {}

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def send(self, method: str, path: str, **request: Any) -> httpx.Response:
        """The answer to one request; an error answer raises its `ApiError` subclass."""
        try:
            response = self._http.request(method, path, **self._authenticated(request))
        except httpx.TransportError as exc:
            raise self._unreachable(method, path, exc) from exc
        if response.is_error:
            raise api_error(response.status_code, _json_or_none(response), response.headers)
        return response

    def json(self, method: str, path: str, **request: Any) -> Any:
        """The JSON body of the answer to one request."""
        return self.send(method, path, **request).json()

    @contextmanager
    def stream(self, method: str, path: str, **request: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it comes; errors as in `send`, including a
        connection that breaks mid-body."""
        try:
            with self._http.stream(method, path, **self._authenticated(request)) as response:
                if response.is_error:
                    response.read()
                    raise api_error(response.status_code, _json_or_none(response), response.headers)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(method, path, exc) from exc

    def _authenticated(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self._auth_headers:
            return request
        return request | {"headers": self._auth_headers | dict(request.get("headers") or {})}

    def _unreachable(self, method: str, path: str, cause: httpx.TransportError) -> Unreachable:
        return Unreachable(
            f"no answer from {self.base_url.rstrip('/')} to {method} {path}: {cause or type(cause).__name__}"
        )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
