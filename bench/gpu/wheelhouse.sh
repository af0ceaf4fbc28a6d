#!/usr/bin/env bash
# Make .whl/ (ignored by git; carried to the GPU machine): the wheels of bench/gpu/requirements.txt for
# Python $1 (default 3.12, the lent machine's), and wrk with the libraries it links, for a machine with
# no network. Usage: bench/gpu/wheelhouse.sh [3.12]
set -euo pipefail
cd "$(dirname "$0")/../.."
python_version=${1:-3.12}
rm -rf .whl && mkdir -p .whl/bin .whl/lib
platforms=""
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms="$platforms --platform ${tag}_x86_64"
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    $platforms -d .whl -r bench/gpu/requirements.txt
cp "$(command -v wrk)" .whl/lib/wrk
ldd "$(command -v wrk)" | awk '/=> \// {print $3}' | grep -E 'libluajit|libssl|libcrypto' | xargs -I{} cp {} .whl/lib/
cat > .whl/bin/wrk <<'WRAPPER'
#!/bin/sh
# wrk with the libraries it was carried with (only wrk sees them)
lib="$(dirname "$0")/../lib"
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$lib/wrk" "$@"
WRAPPER
chmod +x .whl/bin/wrk
du -sh .whl
