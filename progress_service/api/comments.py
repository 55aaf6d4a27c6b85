"""``/api/jobs/{id}/comments``: read a job's comments and comment over HTTP.

Reading needs what joining the room needs (the job belongs to the caller's
team; another team's job answers 404 like a missing one). Posting needs the
role ``reviewer`` and goes the same way as a WebSocket ``chat``: durable
first (comment and audit record in one transaction), then into the job's
stream, so every live member on every node sees it in order with the job's
events. ``Idempotency-Key`` plays the role of ``requestId``: the first
request answers 201, a retry with the same key 200 with the same body.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.exceptions import (
    ClientException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_409_CONFLICT

from progress_service.api.deps import error_responses, int64_cursor, unavailable
from progress_service.comments import Comments
from progress_service.errors import CommentForbidden, CommentsUnavailable, InvalidComment
from progress_service.ids import is_job_id, room_id
from progress_service.services import Services
from progress_service.store import comments as comment_store
from progress_service.store.comments import Comment
from progress_service.store.identity import Principal
from progress_service.store.jobs import get_job

class CommentPage(msgspec.Struct, kw_only=True):
    items: list[Comment]
    #: Pass as ``cursor`` for the next page; None on the last page.
    nextCursor: str | None


class NewComment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(max_length=8192)]


async def _job_of_team(services: Services, job_id: str, principal: Principal) -> None:
    if not is_job_id(job_id) or await get_job(services.engine, job_id, principal.team_id) is None:
        raise NotFoundException("no such job")


class CommentsController(Controller):
    path = "/api/jobs/{job_id:str}/comments"
    tags = ["comments"]

    @get("/", summary="The job's comments, oldest first", responses=error_responses(401, 404))
    async def list_comments(
        self,
        job_id: str,
        principal: Principal,
        services: Services,
        comments: Comments,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 50,
        cursor: Annotated[str | None, Parameter(description="nextCursor of the previous page")] = None,
    ) -> CommentPage:
        await _job_of_team(services, job_id, principal)
        limit = min(limit, services.settings.page_max)
        after = int64_cursor(cursor)
        items = await comment_store.list_comments(services.engine, room_id(job_id), after=after, limit=limit)
        items = await comments.with_ids(job_id, items)
        next_cursor = str(items[-1].commentId) if len(items) == limit else None
        return CommentPage(items=items, nextCursor=next_cursor)

    @post(
        "/",
        summary="Comment on a job (role reviewer or above)",
        responses={
            200: ResponseSpec(data_container=Comment, description="A retry with the same Idempotency-Key: the stored comment"),
            **error_responses(401, 403, 404, 409, 413, 503),
        },
    )
    async def create_comment(
        self,
        job_id: str,
        data: NewComment,
        principal: Principal,
        services: Services,
        comments: Comments,
        idempotency_key: Annotated[
            str,
            HeaderParameter(
                name="Idempotency-Key",
                min_length=1,
                max_length=100,
                description="The request id: a retry with the same key is stored and broadcast once",
                pattern=r"^[^\x00-\x1f\x7f]+$",
            ),
        ],
    ) -> Response[Comment]:
        await _job_of_team(services, job_id, principal)
        try:
            comment, created = await comments.submit(principal, job_id, idempotency_key, data.text)
        except CommentForbidden:
            raise PermissionDeniedException(
                f"commenting needs the role 'reviewer' or above; you are '{principal.role}'"
            ) from None
        except InvalidComment as exc:
            raise ValidationException(str(exc)) from None
        except CommentsUnavailable:
            raise unavailable("the comment was not stored; retry with the same Idempotency-Key") from None
        if not created and comment.text != data.text.strip():
            # The key names another comment: answering it as a success would
            # tell the client its new text was stored when it was not.
            raise ClientException(
                "Idempotency-Key: already used for a different comment on this job; use a new key",
                status_code=HTTP_409_CONFLICT,
            )
        return Response(comment, status_code=HTTP_201_CREATED if created else HTTP_200_OK)
