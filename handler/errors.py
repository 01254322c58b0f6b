"""Client errors as data: one request's mistake must never fail its batch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

BAD_REQUEST = 400
LIMIT_EXCEEDED = 422


@dataclass
class RequestError(Exception):
    """A problem with one request, carrying its HTTP status and the field at fault.

    400 is for malformed or invalid input; 422 for a request that is well formed but
    over a configured limit (prompt tokens, total tokens, instances, stop strings).
    """

    message: str
    field: str | None = None
    status: int = BAD_REQUEST
    details: dict[str, Any] = dataclass_field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.details)
        return body

    def json(self) -> str:
        return json.dumps(self.body())


def limit_error(message: str, field: str, limit: int, value: int) -> RequestError:
    return RequestError(message, field, LIMIT_EXCEEDED, {"limit": limit, "value": value})
