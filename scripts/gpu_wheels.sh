#!/usr/bin/env bash
# Builds .whl/ (git-ignored): the packages that scripts/gpu_checks.sh needs on the lent GPU
# machine and its image lacks (Python 3.12, x86-64, no package index there). Run here, where
# PyPI is reachable, with the project venv set up (make setup); then carry .whl to the device.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    annotated-types==0.8.0 hjson==3.1.0 pebble==5.2.3 pydantic==2.14.3 pydantic-core==2.50.4 pyvers==0.2.3 \
    tensordict==0.15.3 typing-extensions==4.16.0 typing-inspection==0.4.5
# DeepSpeed ships only an sdist: build a pure-Python wheel (no ops compiled, DS_BUILD_OPS=0).
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
du -sh .whl
