#!/usr/bin/env bash
# The GPU checks, in one command, on a machine with one CUDA GPU and no package index
# (the lent device machine: python3 = its PyTorch venv, torch 2.11 + CUDA, transformers, pytest).
# Run from anywhere; it works in the repo root. What that venv lacks comes as wheels in .whl/
# (git-ignored; built by scripts/gpu_wheels.sh; Python 3.12, x86-64): deepspeed (built here from its sdist with DS_BUILD_OPS=0:
# py3-none-any), hjson, pydantic, pydantic-core, annotated-types, typing-inspection,
# typing-extensions, tensordict (pure Python), pyvers, pebble. At most ~8.5 minutes: each step
# has its own time limit.
#
#   0. install the wheels into /tmp/site and rlcore itself (editable: algorithms/, rewards/,
#      configs/ import as rlcore.algorithms, rlcore.rewards, rlcore.conf)
#   a. tests/unit/test_sparse_decode.py -m gpu    (Triton block-sparse decode kernel)
#   b. tests/integration/test_learner_cuda.py     (one DeepSpeed learner rank on CUDA/NCCL)
#   c. bench/sparse_decode.py --device cuda       (writes bench/results/sparse_decode_<gpu>.json)
#
# Every step runs whatever the earlier ones gave; the exit code is non-zero when any failed.
# Logs (gpu_checks.log, summary.txt, junit_*.xml) and the bench's new JSON go to $OUT when it
# is set, else to /tmp/gpu_checks.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
LOGS=${OUT:-/tmp/gpu_checks}
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
START=$SECONDS
declare -a NAMES CODES
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, record the exit code
    local name=$1 limit=$2
    shift 2
    echo
    echo "================ [$name] $* (limit ${limit}s, at +$((SECONDS - START))s)"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "!!! [$name] hit its ${limit}s limit"
    echo "================ [$name] exit $rc in $((SECONDS - t0))s"
    NAMES+=("$name")
    CODES+=("$rc")
}

# ---- 0. packages ------------------------------------------------------------------------
install() {
    local rc=0
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || rc=1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/ folder: using what is installed"
    fi
    # rlcore, editable: the package-dir mapping of pyproject.toml (plain PYTHONPATH=. finds rlcore
    # but not rlcore.algorithms). No index, no build isolation: setuptools from the venv.
    if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
        echo "pip install -e . failed: falling back to a sitecustomize finder for the mapped folders"
        mkdir -p /tmp/site_rlcore
        cat >/tmp/site_rlcore/sitecustomize.py <<EOF
# rlcore's folders that install under other names (pyproject.toml [tool.setuptools] package-dir)
import sys
from importlib.util import spec_from_file_location
from pathlib import Path

_MAPPING = {"rlcore.algorithms": "algorithms", "rlcore.rewards": "rewards", "rlcore.conf": "configs",
            "rlcore.conf.recipe": "recipes"}


class _RlcoreFolders:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in _MAPPING:
            return None
        folder = Path("$ROOT") / _MAPPING[fullname]
        return spec_from_file_location(fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


sys.meta_path.append(_RlcoreFolders)
EOF
        export PYTHONPATH=/tmp/site_rlcore:$PYTHONPATH
    fi
    export PYTHONPATH=$ROOT:$PYTHONPATH
    python3 -c "import rlcore.learner.rank, rlcore.algorithms, rlcore.batch, rlcore.sparse.decode, deepspeed, tensordict; print('imports ok:', rlcore.algorithms.__file__)" || rc=1
    return $rc
}
echo "================ [install] at +0s"
install
NAMES+=("install")
CODES+=("$?")
echo "PYTHONPATH=$PYTHONPATH"

# ---- machine and versions ---------------------------------------------------------------
echo
nvidia-smi || echo "nvidia-smi failed"
python3 - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
for name in ("triton", "transformers", "deepspeed", "tensordict", "pydantic", "pydantic-core", "safetensors", "numpy",
             "pytest", "pytest-timeout", "setuptools", "pip", "typing-extensions"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (absent)")
EOF
# tests/conftest.py defaults DeepSpeed to its CPU accelerator (for the CPU suite). NCCL: one
# process, one node; loopback for its bootstrap socket (the machine may have no other network).
export DS_ACCELERATOR=cuda NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
CUDA_SEEN=$(python3 -c "import torch; print(torch.cuda.is_available())" 2>/dev/null)

# ---- the checks -------------------------------------------------------------------------
step a_sparse_decode_test 120 python3 -m pytest -q -m gpu tests/unit/test_sparse_decode.py tests/unit/test_sparse_resa.py -p no:cacheprovider -rA \
    --junitxml="$LOGS/junit_a_sparse_decode.xml"
step b_learner_cuda_test 180 python3 -m pytest -q -m gpu tests/integration/test_learner_cuda.py -p no:cacheprovider -rA \
    --durations=0 --junitxml="$LOGS/junit_b_learner_cuda.xml"
touch /tmp/gpu_checks.stamp
step c_sparse_decode_bench 180 env PYTHONPATH=.:$PYTHONPATH python3 bench/sparse_decode.py --device cuda
mkdir -p "$LOGS/bench_results"
find bench/results -maxdepth 1 -name '*.json' -newer /tmp/gpu_checks.stamp -exec cp {} "$LOGS/bench_results/" \; -print

# ---- summary ----------------------------------------------------------------------------
failed=0
for code in "${CODES[@]}"; do [ "$code" -ne 0 ] && failed=1; done
{
    echo "gpu_checks summary ($(date -u +%FT%TZ), $((SECONDS - START))s), torch.cuda.is_available: $CUDA_SEEN"
    [ "$CUDA_SEEN" = True ] || echo "  WARNING: no CUDA device seen: the gpu tests were SKIPPED, not run"
    for i in "${!NAMES[@]}"; do
        status=PASS
        [ "${CODES[$i]}" -ne 0 ] && status=FAIL
        printf '  %-24s %s (exit %s)\n' "${NAMES[$i]}" "$status" "${CODES[$i]}"
    done
} | tee "$LOGS/summary.txt"
exit $failed
