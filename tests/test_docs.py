"""README.md and docs/: every command in them runs, or is checked, so the examples cannot rot.

Every fenced block names its kind, and the kind says what happens to it:
- `bash` and `python` blocks run, top to bottom per page, against a fresh demo server (`python -m
  service` on the demo backbone, `RA_ADMIN_TOKEN=s3cret`, gRPC on), in a scratch folder where the
  repository's top-level entries are reachable by their relative paths. The only change made to them
  is the server's address: localhost:8000 and :8001 become the server's free ports. `curl` fails the
  block on any HTTP status >= 400.
- `sh` blocks are not run (Docker, a cluster, a GPU, a database or a long run): each
  `python -m MODULE [SUBCOMMAND] --option` line must name options its `--help` lists, and every
  `-f FILE` and script path must exist.
- `json` and `text` blocks are data.
The block between the `train-for-demo` markers is run by `tests/test_train_folder_to_served.py`.
Relative links must point at files that exist.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from service_process import REPO, ServiceProcess, free_port

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KINDS = {"bash", "python", "sh", "json", "text"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
TRAINING_BLOCK = re.compile(r"<!-- train-for-demo:begin -->.*?<!-- train-for-demo:end -->", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
TOKEN = "s3cret"
# curl as the pages write it, but failing on an HTTP error instead of printing the error's body only
CURL = 'curl() { command curl --fail-with-body "$@"; }\n'


@dataclasses.dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int
    kind: str
    text: str

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: pathlib.Path) -> list[Block]:
    """The page's fenced blocks, less the one that tests/test_train_folder_to_served.py runs."""
    text = TRAINING_BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)
    ]


def commands(text: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def test_the_docs_exist_and_the_readme_links_to_each_page():
    readme = (REPO / "README.md").read_text()
    names = [page.name for page in PAGES[1:]]
    assert names, "docs/ holds the reference pages"
    for name in names:
        assert f"docs/{name}" in readme, f"README.md does not link to docs/{name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_block_says_what_it_is_and_every_link_resolves(page):
    for block in blocks(page):
        assert block.kind in KINDS, (
            f"{block.where()}: a fenced block must be one of {sorted(KINDS)} "
            f"(see tests/test_docs.py), not {block.kind!r}"
        )
        if block.kind == "bash":
            for line in commands(block.text):
                assert not re.match(r"(\S+=\S+\s+)*(docker|docker-compose|kubectl)\b", line), (
                    f"{block.where()}: {line!r} cannot run against the demo: put it in an sh block"
                )
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.relative_to(REPO)}: the link {target!r} points at nothing"


@functools.cache
def help_text(module: str, subcommand: tuple[str, ...]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *subcommand, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, f"python -m {module} {' '.join(subcommand)} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


def check_line(block: Block, line: str) -> None:
    """One `sh` line: a Python command's options exist, a deployment command's files exist."""
    words = shlex.split(re.sub(r"\$\([^)]*\)", "X", line))
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words.pop(0)  # environment assignments
    if not words:
        return
    where = f"{block.where()}: {line!r}"
    if words[0].endswith("python") or words[0].endswith("python3"):
        if words[1:2] != ["-m"]:
            return
        module, rest = words[2], words[3:]
        positional = tuple(w for w in rest[: next((i for i, w in enumerate(rest) if w.startswith("-")), len(rest))])
        if module == "pip":
            return
        subcommand = positional if module == "training" else ()
        text = help_text(module, subcommand[:1])
        for word in rest:
            if word.startswith("--"):
                option = word.split("=", 1)[0]
                assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", text), f"{where}: {option} is not an option"
        return
    if "/" in words[0] and not words[0].startswith("/"):
        assert (REPO / words[0]).exists(), f"{where}: {words[0]} does not exist"
    if words[0] in ("docker", "docker-compose", "kubectl"):
        for flag, value in itertools.pairwise(words):
            if flag in ("-f", "--file"):
                assert (REPO / value).exists(), f"{where}: {value} does not exist"


def test_every_sh_command_names_options_and_files_that_exist():
    lines = [
        (block, line) for page in PAGES for block in blocks(page) if block.kind == "sh" for line in commands(block.text)
    ]
    assert lines
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda pair: check_line(*pair), lines))


def scratch(root: pathlib.Path) -> pathlib.Path:
    """A folder where the repository's entries are reachable by their relative paths, writes go elsewhere."""
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv", "out"):
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return root


RUNNABLE = [page for page in PAGES if any(block.kind in ("bash", "python") for block in blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(REPO)))
def test_the_page_runs_against_the_demo(page, tmp_path):
    grpc_port = free_port()
    server = ServiceProcess(
        {"RA_STORE_DIR": str(tmp_path / "store"), "RA_ADMIN_TOKEN": TOKEN, "RA_GRPC_PORT": str(grpc_port)},
        tmp_path / "server.log",
    ).start()
    (tmp_path / "work").mkdir()
    work = scratch(tmp_path / "work")
    env = {
        **os.environ,
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    try:
        server.wait_ready(120)
        for block in blocks(page):
            if block.kind not in ("bash", "python"):
                continue
            text = re.sub(r"(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{server.port}", block.text)
            text = re.sub(r"(localhost|127\.0\.0\.1):8001\b", f"127.0.0.1:{grpc_port}", text)
            argv = (
                ["bash", "-euo", "pipefail", "-c", CURL + text]
                if block.kind == "bash"
                else [sys.executable, "-c", text]
            )
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (
                f"{block.where()} failed ({done.returncode}):\n{block.text}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}\n"
                f"server:\n{server.log_tail()}"
            )
    finally:
        server.stop()
