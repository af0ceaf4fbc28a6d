"""The long API fuzzing run: schemathesis against the real server with the demo domains.

    python -m bench.fuzz [--examples 200] [--seed 0]

Starts `python -m service` on a loopback port (temporary store, demo backbone and adapters,
management enabled), runs `schemathesis run` over every operation of /openapi.json with all
checks except `positive_data_acceptance` (uploads are checked for content, so arbitrary bytes are
rightly refused), and prints the schemathesis summary, then one JSON line: cases, failures, rc.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from bench.harness.servers import TOKEN, free_port, wait_ready


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "RA_STORE_DIR": store, "RA_ADMIN_TOKEN": TOKEN, "TF_CPP_MIN_LOG_LEVEL": "2"}
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"], env=env
        )
        try:
            wait_ready(url)
            exe = pathlib.Path(sys.executable).parent / "schemathesis"
            result = subprocess.run(
                [
                    str(exe),
                    "run",
                    f"{url}/openapi.json",
                    "-n",
                    str(args.examples),
                    "--seed",
                    str(args.seed),
                    "--checks",
                    "all",
                    "--exclude-checks",
                    "positive_data_acceptance",
                    "-H",
                    f"Authorization: Bearer {TOKEN}",
                    "--request-timeout",
                    "60",
                ],
                capture_output=True,
                text=True,
                cwd=store,
            )  # keep its cache out of the checkout
        finally:
            server.terminate()
            server.wait(30)
    print("\n".join(result.stdout.splitlines()[-30:]))
    generated = re.search(r"(\d+) generated", result.stdout)
    failures = re.search(r"(\d+) unique failures", result.stdout)
    print(
        json.dumps(
            {
                "cases": int(generated.group(1)) if generated else None,
                "failures": int(failures.group(1)) if failures else 0,
                "rc": result.returncode,
                "examples_per_operation": args.examples,
                "seed": args.seed,
            }
        )
    )


if __name__ == "__main__":
    main()
