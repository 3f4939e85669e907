"""Request validation and OpenAPI metadata from the same pydantic models.

Declare a route's body and/or query model with :func:`endpoint`; the view receives the
validated model instances as the keyword arguments ``body`` and ``query``, and the route
appears in ``/openapi.json`` (built by :mod:`api.openapi`) with those schemas. Every
route of the app is listed there; ``endpoint`` adds the schemas, summary and auth.

Example (a child blueprint of ``/api/v1``, see :mod:`api.v1`)::

    from pydantic import Field
    from api.validation import ApiModel, endpoint
    from api.v1 import rate_group

    class PublishIn(ApiModel):                 # extra="forbid": unknown fields → 400
        channel: str = Field(min_length=1, max_length=128)
        data: dict[str, Any]

    class PublishOut(ApiModel):
        id: str

    @bp.post("/notifications")
    @rate_group("admin")
    @endpoint(body=PublishIn, response=PublishOut, status=202, auth="admin",
              summary="Publish a notification")
    async def publish(*, body: PublishIn) -> Response:
        claims = await require_claims(admin=True)  # already checked: 401/403 come first
        ...
        return success({"id": ...}, status=202)

Order before the view runs: the rate limit (``/api/v1`` hooks), then with ``auth=`` the
bearer token (401, or 403 for ``"admin"``), then the query and the body.

Validation rules (all answer 400 ``VALIDATION_ERROR``):
    * the body must be a JSON object (malformed JSON, a non-object, NaN/Infinity,
      invalid UTF-8 → 400 without ``field``); a body over 1 MiB is a 413;
    * pydantic errors → ``field`` (dotted path of the first error), ``message`` and
      ``details`` (every error's field and message; the rejected input is never echoed);
    * a NUL character in any string is refused (:class:`ApiModel` does it).

Query models should subclass :class:`QueryModel` (unknown parameters are ignored, values
arrive as strings and are coerced: ``"5"`` → ``5``, ``"true"`` → ``True``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from quart import request

from api.auth.deps import require_claims
from api.errors import validation_error

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
Auth = Literal["bearer", "admin"] | None

ROUTE_DOC_ATTR = "__hub_route_doc__"


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


class ApiModel(BaseModel):
    """Base of request and response models: unknown fields are refused and no string may
    contain NUL (PostgreSQL text cannot hold it)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any, info: ValidationInfo) -> Any:
        if _has_nul(value):
            raise ValueError(f"{info.field_name} must not contain NUL characters")
        return value


class QueryModel(ApiModel):
    """Base of query-string models: unknown parameters are ignored."""

    model_config = ConfigDict(extra="ignore")


@dataclass(frozen=True)
class RouteDoc:
    """OpenAPI metadata of one view function."""

    summary: str | None = None
    description: str | None = None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    response_list: bool = False
    status: int = 200
    auth: Auth = None
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "__root__")


def _message(err: dict[str, Any]) -> str:
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ")


def raise_validation(error: ValidationError) -> None:
    """Turn a pydantic error into the 400 ``VALIDATION_ERROR`` envelope."""
    errors = error.errors(include_input=False, include_url=False)
    details = [{"field": _format_loc(e.get("loc", ())), "message": _message(e)} for e in errors]
    first = details[0] if details else {"field": "", "message": "invalid request"}
    field_name = first["field"] or None
    message = f"{field_name}: {first['message']}" if field_name else first["message"]
    raise validation_error(message, field=field_name, details=details) from None


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (413 when over the size limit)."""
    raw = await request.get_data(cache=True)
    if not raw or not raw.strip():
        raise validation_error("Request body must be a JSON object")
    try:
        data = json.loads(raw, parse_constant=_bad_constant)
    except (ValueError, RecursionError):
        raise validation_error("Malformed JSON body") from None
    if not isinstance(data, dict):
        raise validation_error("Request body must be a JSON object")
    return data


def parse_query(model: type[BaseModel]) -> Any:
    """Validate ``request.args`` (first value of each parameter) against ``model``."""
    try:
        return model.model_validate(dict(request.args.items()))
    except ValidationError as error:
        raise_validation(error)


def endpoint(
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    response_list: bool = False,
    status: int = 200,
    auth: Auth = None,
    summary: str | None = None,
    description: str | None = None,
    errors: tuple[int, ...] = (),
    tags: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Validate the request against ``body``/``query`` and document the route.

    Args:
        body: model of the JSON body; the view gets ``body=<instance>``.
        query: model of the query string; the view gets ``query=<instance>``.
        response: model of ``data`` in the success envelope (documentation only).
        response_list: ``data`` is a list of ``response`` (with ``pagination``).
        status: the success status code.
        auth: ``"bearer"`` or ``"admin"``: the token is checked (401/403) *before* the
            body is validated, so an anonymous caller never learns about the body's
            rules; the view gets the claims from ``require_claims()`` (cached).
        summary, description, tags: OpenAPI texts.
        errors: extra error statuses to document besides the usual ones.
    """
    doc = RouteDoc(
        summary, description, body, query, response, response_list, status, auth, errors, tags
    )

    def wrap(view: F) -> F:
        @functools.wraps(view)
        async def validated(*args: Any, **kwargs: Any) -> Any:
            if auth is not None:
                await require_claims(admin=auth == "admin")
            if query is not None:
                kwargs["query"] = parse_query(query)
            if body is not None:
                data = await read_json_object()
                try:
                    kwargs["body"] = body.model_validate(data)
                except ValidationError as error:
                    raise_validation(error)
            return await view(*args, **kwargs)

        setattr(validated, ROUTE_DOC_ATTR, doc)
        return validated  # type: ignore[return-value]

    return wrap


def route_doc(view: Callable[..., Any]) -> RouteDoc | None:
    """The :class:`RouteDoc` of a view declared with :func:`endpoint`, if any."""
    return getattr(view, ROUTE_DOC_ATTR, None)
