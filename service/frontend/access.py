"""Who may do what: the one place that decides access.

Without a keys file (the embedded default) predicting and listing are open, and management (POST/DELETE
under /adapters, the Open Inference Protocol's /v2/repository) and training (/training/jobs) need
`Authorization: Bearer <RA_ADMIN_TOKEN>`; with no token configured they are disabled (403), never open.

With `RA_API_KEYS_FILE` every request but health, docs and the page needs a key (401 without one). A key
sees only the domains its glob patterns match: any other domain answers exactly as an unknown one does
(404, same body), so keys cannot enumerate each other's domains. Management and /metrics need an admin
key (or `RA_ADMIN_TOKEN`), training a key with `"train": true` (or an admin key), for the domains its
patterns match; a key may carry a request rate limit (token bucket, 429 with Retry-After),
counted once per host (`RateLimits`, in a table every front end shares).

Everything here runs before the request body is received. Secrets are never stored: the file holds the
sha256 of each key, and a presented key is hashed first, then looked up by that hash (which the caller
cannot steer towards a stored one); `RA_ADMIN_TOKEN` is compared in constant time.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import pathlib
import re
import secrets
import time
from os.path import commonpath

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.exceptions import UnknownDomainError
from service.frontend.errors import ApiError
from service.frontend.host_table import HostTable, Layout

_log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/readyz",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
    }
)
PUBLIC_PREFIXES = ("/static/",)
# paths that name one domain: the scope check answers 404 for a domain outside the key's patterns
DOMAIN_PATHS = (
    re.compile(r"^/predict/([^/]+)$"),
    re.compile(r"^/adapters/([^/]+)(?:/rollback)?$"),
    re.compile(r"^/v2/models/([^/]+)(?:/.*)?$"),
)
PATTERN = re.compile(r"^[a-z0-9_\-*?\[\]!]{1,64}$")


def is_management(method: str, path: str) -> bool:
    if path.startswith("/v2/repository/") or path == "/v2/repository":
        return True
    return method in ("POST", "DELETE") and (path == "/adapters" or path.startswith("/adapters/"))


def is_training(path: str) -> bool:
    """The training jobs' routes: like management, they write domains (and read tenants' jobs)."""
    return path == "/training/jobs" or path.startswith("/training/jobs/")


def is_audited(method: str, path: str) -> bool:
    """The calls that change something for everyone: each one gets an audit line."""
    return is_management(method, path) or (method == "POST" and is_training(path))


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def named_domain(path: str) -> str | None:
    for pattern in DOMAIN_PATHS:
        match = pattern.match(path)
        if match:
            return match.group(1)
    return None


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key of the keys file, the admin token, or anyone (no keys file)."""

    name: str
    admin: bool
    patterns: tuple[str, ...] = ("*",)
    rate_per_s: float | None = None
    burst: int | None = None
    train: bool = False  # may submit training jobs for its domains (admins may)
    _pattern: re.Pattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # the globs as one compiled alternation (none: matches nothing)
        regex = "|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns) or r"(?!)"
        object.__setattr__(self, "_pattern", re.compile(regex))

    @property
    def may_train(self) -> bool:
        return self.admin or self.train

    @property
    def every_domain(self) -> bool:
        return "*" in self.patterns

    def may_use(self, domain: str) -> bool:
        return self.every_domain or self._pattern.match(domain) is not None

    @property
    def prefix(self) -> str:
        """What every domain this principal may use starts with (narrows listings)."""
        literal = [re.split(r"[*?\[]", p, maxsplit=1)[0] for p in self.patterns]
        return commonpath(literal) if literal else ""


ANYONE = Principal("anonymous", admin=False)
ADMIN = Principal("admin", admin=True)


class KeySpec(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    domains: list[str] = Field(default_factory=list)
    admin: bool = False
    train: bool = False
    rate_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)

    @field_validator("domains")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if not PATTERN.match(p)]
        if bad:
            raise ValueError(f"domain patterns are globs of domain-name characters and * ? [ ]: {bad}")
        return value


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeySpec]


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where and what to fix."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read_keys_file(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise KeysFileError(f"RA_API_KEYS_FILE {path}: cannot read it ({exc.strerror}).") from exc


def load_keys(path: pathlib.Path, text: str | None = None) -> dict[str, Principal]:
    """sha256 hex → principal, from the JSON keys file (or its `text`, already read); raise
    `KeysFileError` with what to fix."""
    try:
        raw = json.loads(read_keys_file(path) if text is None else text)
        parsed = KeysFile.model_validate(raw)
    except json.JSONDecodeError as exc:
        raise KeysFileError(
            f"RA_API_KEYS_FILE {path}: not JSON ({exc}). Expected "
            '{"keys": [{"name": ..., "key_sha256": ..., "domains": [...], "admin": false}]}.'
        ) from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise KeysFileError(f"RA_API_KEYS_FILE {path}: {problems}.") from exc
    keys: dict[str, Principal] = {}
    names: set[str] = set()
    for spec in parsed.keys:
        digest = spec.key_sha256.lower()
        if digest in keys or spec.name in names:
            raise KeysFileError(
                f"RA_API_KEYS_FILE {path}: key {spec.name!r} repeats a name or a key_sha256; each key needs its own."
            )
        names.add(spec.name)
        keys[digest] = Principal(
            spec.name,
            spec.admin,
            tuple(spec.domains),
            spec.rate_per_s,
            spec.burst or (max(1, math.ceil(spec.rate_per_s)) if spec.rate_per_s else None),
            spec.train,
        )
    return keys


class KeyRing:
    """The keys of `RA_API_KEYS_FILE`, reloaded when the file changes; a file that turns bad keeps the
    last good keys (and the error is logged and counted)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._text = read_keys_file(path)
        self.keys = load_keys(path, self._text)
        self.last_error: str | None = None

    def reload_if_changed(self) -> bool:
        """True when new keys were loaded; raise `KeysFileError` (keeping the old keys) if the file is bad.

        The file is small, so it is read whole and compared: a change is never missed, however quickly
        it follows the last one or however it was written (timestamps are too coarse for that)."""
        try:
            text = read_keys_file(self.path)
        except KeysFileError as exc:
            if str(exc) == self.last_error:
                return False  # said once already
            self.last_error = str(exc)
            raise
        if text == self._text:
            return False
        self._text = text
        try:
            self.keys = load_keys(self.path, text)
        except KeysFileError as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        return True

    def find(self, secret: str) -> Principal | None:
        """The key's principal. The lookup is by the sha256 of the presented key, which the caller cannot
        steer towards a stored hash, so its timing reveals nothing of any stored key."""
        return self.keys.get(hash_key(secret))


BUCKETS = Layout(
    np.dtype([("key", "<u8"), ("stamp", "<f8"), ("tokens", "<f8"), ("rate", "<f8"), ("burst", "<i8")]), slots=4096
)  # 1,000 keys fit with room to spare


class RateLimits:
    """A token bucket per key name (`rate_per_s` on average, bursts of up to `burst`), in a `HostTable` that
    every front end of the host shares, so a key gets its rate once per host however the kernel spreads
    its connections. `stamp` is the time the tokens were counted.

    A bucket whose stored rate or burst differ from the key's (the keys file changed its limit) starts
    full with the new ones. The table replaces the least recently touched bucket of a window when it
    needs room; a bucket idle for (burst - tokens) / rate is full again, and a new one starts full,
    so replacing it loses nothing."""

    def __init__(self, table: HostTable):
        if table.layout.dtype != BUCKETS.dtype:
            raise ValueError(
                f"RateLimits needs a table of access.BUCKETS records. Received: dtype={table.layout.dtype}"
            )
        self.table = table

    def take(self, principal: Principal) -> float:
        """0 if the principal's request may go now (a token is taken), else the seconds until it may."""
        rate, burst = principal.rate_per_s, principal.burst
        if rate is None:
            return 0.0

        def full(row: np.void) -> None:
            row["tokens"], row["rate"], row["burst"] = burst, rate, burst

        with self.table.row(principal.name, full) as row:
            now = time.monotonic()
            if (row["rate"], row["burst"]) != (rate, burst):
                full(row)
            tokens = min(burst, float(row["tokens"]) + max(0.0, now - float(row["stamp"])) * rate)
            row["stamp"] = now
            if tokens >= 1:
                row["tokens"] = tokens - 1
                return 0.0
            row["tokens"] = tokens
            return (1 - tokens) / rate


def _bearer(authorization: str) -> str | None:
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


class Denied(Exception):
    """A refused request: the answer to give (`ApiError`, or `UnknownDomainError` for a domain the key may
    not see) and who asked, when known (for the per-key metrics and the audit log)."""

    def __init__(self, reason: ApiError | UnknownDomainError, principal: Principal | None = None):
        super().__init__(str(reason))
        self.reason, self.principal = reason, principal


class Access:
    """The decision for one request, from its method, path and Authorization header."""

    def __init__(self, admin_token: str | None, keyring: KeyRing | None, limits: RateLimits):
        self.admin_token, self.keyring, self.limits = admin_token, keyring, limits

    def _is_admin_token(self, given: str) -> bool:
        return self.admin_token is not None and secrets.compare_digest(given.encode(), self.admin_token.encode())

    def decide(self, method: str, path: str, authorization: str) -> Principal:
        """The principal the request acts for, or raise `Denied`: 401/403/429, or an unknown domain (404)
        for a domain the key may not see."""
        if is_public(path):
            return ANYONE
        given = _bearer(authorization)
        if self.keyring is None:
            if not (is_management(method, path) or is_training(path)):
                return ANYONE
            what = "Training domains" if is_training(path) else "Adapter management"
            if self.admin_token is None:
                raise Denied(
                    ApiError(
                        403,
                        "management_disabled",
                        f"{what} is disabled: start the service with RA_ADMIN_TOKEN set.",
                    )
                )
            if given is None:
                raise Denied(
                    _unauthorized(
                        f"{what} needs the admin token: send 'Authorization: Bearer "
                        "<RA_ADMIN_TOKEN>' (on the web page, enter it in the API key field)."
                    )
                )
            if not self._is_admin_token(given):
                raise Denied(_unauthorized("The bearer token is wrong."))
            return ADMIN

        if given is None:
            raise Denied(_unauthorized("Send your API key as 'Authorization: Bearer <key>'."))
        principal = ADMIN if self._is_admin_token(given) else self.keyring.find(given)
        if principal is None:
            raise Denied(_unauthorized("The API key is not known."))
        wait = self.limits.take(principal)
        if wait > 0:
            raise Denied(
                ApiError(
                    429,
                    "rate_limited",
                    f"Key {principal.name!r} is over its rate of "
                    f"{principal.rate_per_s:g} requests/s; retry after the pause.",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                ),
                principal,
            )
        if (is_management(method, path) or path == "/metrics") and not principal.admin:
            raise Denied(
                ApiError(
                    403,
                    "forbidden",
                    f"Key {principal.name!r} may not manage adapters or read the metrics; use an admin key.",
                ),
                principal,
            )
        if is_training(path) and not principal.may_train:
            raise Denied(
                ApiError(
                    403,
                    "forbidden",
                    f'Key {principal.name!r} may not train domains; use a key with "train": true in '
                    "RA_API_KEYS_FILE (or an admin key).",
                ),
                principal,
            )
        domain = named_domain(path)
        if domain is not None and not principal.may_use(domain):
            raise Denied(UnknownDomainError(domain), principal)
        return principal
