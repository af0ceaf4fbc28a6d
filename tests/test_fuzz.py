"""API fuzzing with schemathesis against the real server's OpenAPI spec (a short run; the long one is
`python -m bench.fuzz`). Every generated request must get a non-5xx answer that matches the schema.

`positive_data_acceptance` is excluded: a schema-valid upload (any bytes as `file` or `bundle`) is
still checked for content, and a non-image or a non-bundle is rightly refused with 4xx.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from service_helpers import ADMIN_TOKEN, get_assets
from service_process import running_server

from service.record.directory import DirectoryRecord


def schemathesis_command() -> list[str]:
    exe = shutil.which("schemathesis", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is missing: pip install -e '.[dev]'")
    return [exe]


def fuzz(url: str, examples: int, seed: int, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *schemathesis_command(),
            "run",
            f"{url}/openapi.json",
            "-n",
            str(examples),
            "--seed",
            str(seed),
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "-H",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )  # its cache goes to cwd


def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path_factory):
    assets = get_assets(tmp_path_factory)
    store = tmp_path_factory.mktemp("fuzz-store")
    for domain in ("alpha", "beta"):
        DirectoryRecord(store).add(domain, replace=False, data=assets.data(domain))
    env = {"RA_BACKBONE": str(assets.backbone_path), "RA_DEMO_ADAPTERS": "false", "RA_ADMIN_TOKEN": ADMIN_TOKEN}
    with running_server(store, env) as url:
        result = fuzz(url, examples=15, seed=1, cwd=tmp_path_factory.mktemp("schemathesis"))
    summary = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, summary
    assert " passed" in summary and "failures" not in summary.split("Test cases:")[-1], summary
