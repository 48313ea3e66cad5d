"""API errors rendered as `Status` objects, worded like the real API server (clients parse reason and code)."""

from __future__ import annotations

from typing import Any

import kmock

from gpujob.sandbox.resources import Resource

Json = dict[str, Any]


class ApiError(kmock.KubernetesError):
    """A kmock Kubernetes error that carries a real Status `reason` and `details`."""

    def status_object(self) -> Json:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details or {},
            "code": self.status,
        }


def _details(resource: Resource | None, name: str | None, kind: str | None = None) -> Json:
    details: Json = {}
    if name:
        details["name"] = name
    if resource is not None:
        details["group"] = resource.group
        details["kind"] = kind or resource.plural
    return details


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.qualified} "{name}" not found', _details(resource, name))


def namespace_not_found(namespace: str) -> ApiError:
    return ApiError(404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"})


def unknown_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(resource: Resource, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{resource.qualified} "{name}" already exists', _details(resource, name))


def conflict(resource: Resource, name: str) -> ApiError:
    message = (
        f'Operation cannot be fulfilled on {resource.qualified} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    return ApiError(409, "Conflict", message, _details(resource, name))


def invalid(resource: Resource, name: str, field_errors: list[str]) -> ApiError:
    qualified_kind = f"{resource.kind}.{resource.group}" if resource.group else resource.kind
    summary = field_errors[0] if len(field_errors) == 1 else "[" + ", ".join(field_errors) + "]"
    causes = [
        {"reason": "FieldValueInvalid", "message": error.split(": ", 1)[-1], "field": error.split(": ", 1)[0]}
        for error in field_errors
    ]
    details = {**_details(resource, name, resource.kind), "causes": causes}
    return ApiError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {summary}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message, {})


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    return ApiError(405, "MethodNotAllowed", message, {})


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message, {})


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}", {}
    )
