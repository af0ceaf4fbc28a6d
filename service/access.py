"""Who may do what: the one place that decides access.

Management (POST/DELETE under /adapters, and the Open Inference Protocol's model repository under
/v2/repository) needs `Authorization: Bearer <RA_ADMIN_TOKEN>`, checked
before the request body is received; with no token configured it is disabled (403), never open.
Everything else is open.
"""

from __future__ import annotations

import secrets

from pydantic import SecretStr

from service.errors import ApiError


def is_management(method: str, path: str) -> bool:
    if path.startswith("/v2/repository/") or path == "/v2/repository":
        return True
    return method in ("POST", "DELETE") and (path == "/adapters" or path.startswith("/adapters/"))


def check_admin(authorization: str, token: SecretStr | None) -> None:
    """Bearer token compared in constant time; raise `ApiError` 401/403 otherwise."""
    if token is None:
        raise ApiError(403, "management_disabled",
                       "Adapter management is disabled: start the service with RA_ADMIN_TOKEN set.")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "Send 'Authorization: Bearer <RA_ADMIN_TOKEN>'.",
                       headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "The bearer token is wrong.", headers={"WWW-Authenticate": "Bearer"})
