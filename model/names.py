"""Domain names: one rule for bundles, the registry of record, URLs and settings (no framework import)."""

from __future__ import annotations

import re

from model.safetensors_io import InvalidFileError

DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_domain_name(name: object) -> str:
    """Return `name` if it is a valid domain name, else raise `InvalidFileError('domain_name')`."""
    if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
        raise InvalidFileError(
            "domain_name",
            f"Invalid domain name {name!r}: use 1-63 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit.",
        )
    return name
