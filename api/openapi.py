"""``GET /openapi.json`` and ``GET /docs``, generated from the app's own routes.

Every URL rule of the app becomes an operation. Views declared with
:func:`api.validation.endpoint` contribute their summary, auth, body and query models
(the very models that validate requests) and their response model wrapped in the
SPEC §2 envelope; the others get a generic envelope. The document is built once, on
first request, from the live URL map.

``/docs`` is a Swagger UI page that loads its assets from a CDN (the API itself needs
no internet access; only the browser showing the docs does).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from quart import Blueprint, Response, current_app

from api.validation import RouteDoc, route_doc

if TYPE_CHECKING:
    from quart import Quart

TITLE = "notification-hub API"
VERSION = "1.0.0"
REF = "#/components/schemas/{model}"
_CONVERTER_RE = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
#: Not REST operations: the docs themselves, Prometheus text and the admin page's files.
_SKIP_ENDPOINTS = {
    "static",
    "docs.openapi_json",
    "docs.docs",
    "metrics",
    "admin_page.index",
    "admin_page.asset",
}
_SKIP_METHODS = {"HEAD", "OPTIONS"}
_ERROR_TEXT = {
    400: "Validation error",
    401: "Missing, invalid, expired or revoked token",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    429: "Rate limit exceeded",
    500: "Internal error",
    503: "Service unavailable",
}

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>notification-hub API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


class _Components:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {
            "Meta": {
                "type": "object",
                "properties": {
                    "timestamp": {"type": "string", "format": "date-time"},
                    "request_id": {"type": "string"},
                },
                "required": ["timestamp", "request_id"],
            },
            "Error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                    "details": {},
                    "retry_after": {"type": "integer"},
                },
                "required": ["code", "message"],
            },
            "ErrorEnvelope": {
                "type": "object",
                "properties": {
                    "status": {"const": "error"},
                    "error": {"$ref": REF.format(model="Error")},
                    "meta": {"$ref": REF.format(model="Meta")},
                },
                "required": ["status", "error", "meta"],
            },
            "Pagination": {
                "type": "object",
                "properties": {
                    "page": {"type": "integer"},
                    "limit": {"type": "integer"},
                    "total_items": {"type": "integer"},
                    "total_pages": {"type": "integer"},
                    "has_next": {"type": "boolean"},
                    "has_prev": {"type": "boolean"},
                },
            },
        }

    def ref(self, model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        for name, sub in schema.pop("$defs", {}).items():
            self.schemas.setdefault(name, sub)
        self.schemas.setdefault(model.__name__, schema)
        return {"$ref": REF.format(model=model.__name__)}

    def parameters(self, model: type[BaseModel]) -> list[dict[str, Any]]:
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self.schemas.setdefault(name, sub)
        required = set(schema.get("required", []))
        params = []
        for name, prop in schema.get("properties", {}).items():
            description = prop.pop("description", None)
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
            }
            if description:
                param["description"] = description
            params.append(param)
        return params


def _success_schema(doc: RouteDoc | None, components: _Components) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if doc is not None and doc.response is not None:
        item = components.ref(doc.response, "serialization")
        data = {"type": "array", "items": item} if doc.response_list else item
    properties: dict[str, Any] = {
        "status": {"const": "success"},
        "data": data,
        "message": {"type": "string"},
        "meta": {"$ref": REF.format(model="Meta")},
    }
    if doc is not None and doc.response_list:
        properties["pagination"] = {"$ref": REF.format(model="Pagination")}
    return {"type": "object", "properties": properties, "required": ["status", "data", "meta"]}


def _operation(
    rule_path: str,
    endpoint: str,
    method: str,
    view: Any,
    params: list[dict[str, Any]],
    c: _Components,
) -> dict[str, Any]:
    doc = route_doc(view)
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}_{endpoint.replace('.', '_')}",
        "summary": (doc.summary if doc and doc.summary else view.__name__.replace("_", " ")),
    }
    if doc and doc.description:
        op["description"] = doc.description
    if doc and doc.tags:
        op["tags"] = list(doc.tags)
    parameters = list(params)
    if doc and doc.query is not None:
        parameters += c.parameters(doc.query)
    if parameters:
        op["parameters"] = parameters
    if doc and doc.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": c.ref(doc.body)}},
        }
    status = doc.status if doc else 200
    responses: dict[str, Any] = {
        str(status): {
            "description": "Success",
            "content": {"application/json": {"schema": _success_schema(doc, c)}},
        }
    }
    errors = {429, 500}
    if rule_path.startswith("/api/"):
        errors.add(404)
    if doc:
        errors.update(doc.errors)
        if doc.body is not None or doc.query is not None:
            errors.add(400)
        if doc.body is not None:
            errors.add(413)
        if doc.auth is not None:
            errors.add(401)
            op["security"] = [{"bearerAuth": []}]
        if doc.auth == "admin":
            errors.add(403)
    for code in sorted(errors):
        responses[str(code)] = {
            "description": _ERROR_TEXT.get(code, "Error"),
            "content": {
                "application/json": {"schema": {"$ref": REF.format(model="ErrorEnvelope")}}
            },
        }
    op["responses"] = responses
    return op


def build_openapi(app: Quart) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``app``."""
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint in _SKIP_ENDPOINTS or getattr(rule, "websocket", False):
            continue
        view = app.view_functions.get(rule.endpoint)
        if view is None:
            continue
        params: list[dict[str, Any]] = []

        def to_param(match: re.Match[str], params: list[dict[str, Any]] = params) -> str:
            converter, name = match.group(1) or "string", match.group(2)
            schema: dict[str, Any] = {"type": "string"}
            if converter == "int":
                schema = {"type": "integer"}
            elif converter == "uuid":
                schema = {"type": "string", "format": "uuid"}
            params.append({"name": name, "in": "path", "required": True, "schema": schema})
            return "{" + name + "}"

        path = _CONVERTER_RE.sub(to_param, rule.rule)
        for method in sorted((rule.methods or set()) - _SKIP_METHODS):
            paths.setdefault(path, {})[method.lower()] = _operation(
                rule.rule, rule.endpoint, method, view, params, components
            )
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION},
        "paths": paths,
        "components": {
            "schemas": components.schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def create_docs_blueprint() -> Blueprint:
    """``/openapi.json`` (raw document, not enveloped) and ``/docs`` (Swagger UI)."""
    blueprint = Blueprint("docs", __name__)

    @blueprint.get("/openapi.json")
    async def openapi_json() -> Response:
        document = current_app.config.get("HUB_OPENAPI")
        if document is None:
            document = build_openapi(current_app)
            current_app.config["HUB_OPENAPI"] = document
        return Response(
            json.dumps(document, separators=(",", ":")), content_type="application/json"
        )

    @blueprint.get("/docs")
    async def docs() -> Response:
        return Response(DOCS_HTML, content_type="text/html; charset=utf-8")

    return blueprint
