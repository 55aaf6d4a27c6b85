"""``/api/jobs/{id}/instructions`` and ``/api/jobs/{id}/permissions/{pid}``: steer a running job over HTTP.

The same path as the WebSocket's ``steer`` and ``decide``
(:mod:`progress_service.steering`); ``Idempotency-Key`` plays the role of
``requestId``: a retry with the same key delivers once and answers the same
outcome. 200 once delivered (the CLI echoed the instruction) or answered,
202 with state ``queued`` when the wait ran out.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, post
from litestar.exceptions import (
    ClientException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_409_CONFLICT

from progress_service.api.deps import error_responses, unavailable
from progress_service.errors import SteerRefusal
from progress_service.events import INSTRUCTION_MAX_CHARS, SteerResult
from progress_service.ids import is_job_id
from progress_service.steering import Steering
from progress_service.store.identity import Principal

IdempotencyKey = Annotated[
    str,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=100,
        description="The request id: a retry with the same key is delivered once",
        pattern=r"^[^\x00-\x1f\x7f]+$",
    ),
]


class NewInstruction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(max_length=INSTRUCTION_MAX_CHARS)]


class Decision(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    allow: bool
    message: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


def _http_error(exc: SteerRefusal) -> Exception:
    """The HTTP form of a refusal (codes as in docs/protocol.md)."""
    if exc.code == "forbidden":
        return PermissionDeniedException(exc.message)
    if exc.code == "not_found":
        return NotFoundException(exc.message)
    if exc.code == "invalid":
        return ValidationException(exc.message)
    if exc.code in ("unavailable", "worker_gone"):
        return unavailable(f"{exc.code}: {exc.message}")
    return ClientException(f"{exc.code}: {exc.message}", status_code=HTTP_409_CONFLICT)


def _answer(result: SteerResult) -> Response[SteerResult]:
    return Response(result, status_code=HTTP_202_ACCEPTED if result.state == "queued" else HTTP_200_OK)


_RESPONSES = {
    200: ResponseSpec(data_container=SteerResult, description="Delivered (the CLI echoed it) or answered"),
    202: ResponseSpec(data_container=SteerResult, description="Still queued when the wait ran out; retry with the same key"),
    **error_responses(401, 403, 404, 409, 503),
}


class SteeringController(Controller):
    path = "/api/jobs/{job_id:str}"
    tags = ["steering"]

    @post("/instructions", summary="Send an instruction to the job's running CLI", responses=_RESPONSES)
    async def instruct(
        self, job_id: str, data: NewInstruction, principal: Principal, steering: Steering, idempotency_key: IdempotencyKey
    ) -> Response[SteerResult]:
        """The job's submitter, role submitter or above, or a reviewer of a job submitted ``steerable: "reviewers"``."""
        if not is_job_id(job_id):
            raise NotFoundException("no such job")
        try:
            result = await steering.instruct(principal, job_id, idempotency_key, data.text)
        except SteerRefusal as exc:
            raise _http_error(exc) from None
        return _answer(result)

    @post("/permissions/{permission_id:str}", summary="Allow or deny a pending tool use", responses=_RESPONSES)
    async def decide(
        self,
        job_id: str,
        permission_id: str,
        data: Decision,
        principal: Principal,
        steering: Steering,
        idempotency_key: IdempotencyKey,
    ) -> Response[SteerResult]:
        """Answer a ``permission`` event of a ``permissionMode: "ask"`` job; the first answer wins."""
        if not is_job_id(job_id) or not is_job_id(permission_id):
            raise NotFoundException("no such job or permission prompt")
        try:
            result = await steering.decide(
                principal, job_id, idempotency_key, permission_id, data.allow, data.message
            )
        except SteerRefusal as exc:
            raise _http_error(exc) from None
        return _answer(result)
