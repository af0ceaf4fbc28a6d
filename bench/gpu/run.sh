#!/usr/bin/env bash
# The GPU check's entry point on the lent machine (the `device` tool, carrying .whl from
# bench/gpu/wheelhouse.sh): install the carried wheels beside the machine's own packages, put the
# carried wrk on the path, run `python -m bench.gpu.check` with these arguments.
# Usage: bench/gpu/run.sh [--backend jax|torch] [--cpu] [...]; PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
site=${RA_CHECK_SITE:-/tmp/ra-site}
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" PATH="$PWD/.whl/bin:$PATH"
export PYTHONUNBUFFERED=1
exec "$python" -m bench.gpu.check "$@"
