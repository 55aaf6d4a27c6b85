"""The HTTP half of the terminal client: submit, read and cancel jobs.

Every failure becomes :class:`ApiError` with a message a person can act on
(the API's ``{status_code, detail, extra}`` body, or why the service could
not be reached). The token travels only in the ``Authorization`` header and
never appears in a message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from progress_service.errors import ApiError
from progress_service.events import JobSnapshot

#: Connect and read timeouts of one request (seconds).
HTTP_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
#: Instructions and answers wait for the CLI (up to PS_STEER_ACK_TIMEOUT on the server).
STEER_TIMEOUT = httpx.Timeout(120.0, connect=5.0)

_snapshot_dec = msgspec.json.Decoder(JobSnapshot)


def _describe(response: httpx.Response) -> str:
    """``HTTP 422: prompt: must not be blank`` from the API's error body."""
    detail: Any = None
    extra: Any = None
    try:
        body = response.json()
        if isinstance(body, dict):
            detail, extra = body.get("detail"), body.get("extra")
    except ValueError:
        pass
    if not detail:
        detail = response.reason_phrase or "request failed"
    msg = f"HTTP {response.status_code}: {detail}"
    if extra:
        # Litestar validation errors: [{"message": ..., "key": ...}, ...]
        if isinstance(extra, list):
            parts = []
            for item in extra:
                if isinstance(item, dict):
                    key = item.get("key")
                    text = item.get("message", "")
                    parts.append(f"{key}: {text}" if key else str(text))
                else:
                    parts.append(str(item))
            msg += " (" + "; ".join(parts) + ")"
        else:
            msg += f" ({extra})"
    if response.status_code == 401:
        msg += " - check the API token (--token or PS_TOKEN)"
    return msg


class JobsApi:
    """A small client of ``/api/jobs`` on one service, with one API token."""

    def __init__(self, base_url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=HTTP_TIMEOUT,
            transport=transport,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> JobsApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None, *, wait: bool = False
    ) -> httpx.Response:
        timeout = STEER_TIMEOUT if wait else HTTP_TIMEOUT
        try:
            response = await self._client.request(method, path, json=json, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            # The request URL carries no secret; name the service, not the headers.
            raise ApiError(f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        if response.status_code >= 400:
            raise ApiError(_describe(response), response.status_code)
        return response

    async def submit(
        self,
        prompt: str,
        *,
        workdir: str | None = None,
        model: str | None = None,
        max_turns: int | None = None,
    ) -> JobSnapshot:
        """``POST /api/jobs``: queue a job; its first snapshot."""
        body: dict[str, Any] = {"prompt": prompt}
        if workdir is not None:
            body["workdir"] = workdir
        if model is not None:
            body["model"] = model
        if max_turns is not None:
            body["maxTurns"] = max_turns
        return self._snapshot(await self._request("POST", "/api/jobs", json=body))

    async def get_job(self, job_id: str) -> JobSnapshot:
        """``GET /api/jobs/{id}``: the job's current state."""
        return self._snapshot(await self._request("GET", f"/api/jobs/{quote(job_id, safe='')}"))

    async def cancel(self, job_id: str) -> JobSnapshot:
        """``POST /api/jobs/{id}/cancel``: ask the job to stop."""
        return self._snapshot(await self._request("POST", f"/api/jobs/{quote(job_id, safe='')}/cancel"))

    async def instruct(self, job_id: str, text: str, key: str) -> dict[str, Any]:
        """``POST /api/jobs/{id}/instructions``: the outcome (``state``, ``eventId``)."""
        path = f"/api/jobs/{quote(job_id, safe='')}/instructions"
        response = await self._request("POST", path, json={"text": text}, headers={"Idempotency-Key": key}, wait=True)
        outcome: dict[str, Any] = response.json()
        return outcome

    async def decide(self, job_id: str, permission_id: str, allow: bool, message: str | None, key: str) -> dict[str, Any]:
        """``POST /api/jobs/{id}/permissions/{pid}``: the outcome (``state``, ``eventId``)."""
        path = f"/api/jobs/{quote(job_id, safe='')}/permissions/{quote(permission_id, safe='')}"
        body: dict[str, Any] = {"allow": allow}
        if message:
            body["message"] = message
        response = await self._request("POST", path, json=body, headers={"Idempotency-Key": key}, wait=True)
        outcome: dict[str, Any] = response.json()
        return outcome

    def _snapshot(self, response: httpx.Response) -> JobSnapshot:
        try:
            return _snapshot_dec.decode(response.content)
        except msgspec.DecodeError as exc:
            raise ApiError(f"unexpected answer from {self.base_url}: {exc}") from None
