"""One audit log line per management action (logger `service.frontend.audit`, JSON): who, what, which domain and
version, the bundle's sha256, and the outcome. The Gatekeeper writes it once the answer is known; the
routes add what only they learn (the version, the bundle's hash) to `request.state.audit`.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import json
import logging
import re

_log = logging.getLogger("service.frontend.audit")

ACTIONS = (
    (re.compile(r"^POST /adapters$"), "register"),
    (re.compile(r"^DELETE /adapters/(?P<domain>[^/]+)$"), "delete"),
    (re.compile(r"^POST /adapters/(?P<domain>[^/]+)/rollback$"), "rollback"),
    (re.compile(r"^POST /v2/repository/index$"), "index"),
    (re.compile(r"^POST /v2/repository/models/(?P<domain>[^/]+)/(?P<action>load|unload)$"), None),
)


def action_of(method: str, path: str) -> tuple[str, str | None]:
    """(action, domain named by the path) of a management request."""
    for pattern, action in ACTIONS:
        match = pattern.match(f"{method} {path}")
        if match:
            found = match.groupdict()
            return action or found["action"], found.get("domain")
    return f"{method} {path}", None


def write(key: str, method: str, path: str, status: int, details: dict | None) -> None:
    action, domain = action_of(method, path)
    details = details or {}
    line = {
        "key": key,
        "action": details.get("action", action),
        "domain": details.get("domain", domain),
        "version": details.get("version"),
        "sha256": details.get("sha256"),
        "status": status,
        "outcome": "ok" if status < 400 else "refused" if status in (401, 403, 429) else "failed",
    }
    _log.info(json.dumps(line, sort_keys=True))
