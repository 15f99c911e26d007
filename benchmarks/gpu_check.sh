#!/usr/bin/env bash
# The GPU check of issue 14 in one command: the CUDA tests, then benchmarks/gpu.py.
#
#   bash benchmarks/gpu_check.sh [OUT]      # OUT: folder for the results (default $OUT, else
#                                           # /tmp/gpu-check)
#
# Installs nothing: it runs the working tree as it is (PYTHONPATH=the repository) with the
# machine's own python3, which must hold a CUDA build of torch (and triton for the solver
# kernel). Time budget, about 8 minutes in all: 4 min for the tests, 4.5 min for the
# benchmark (its step table stops adding rows after --budget seconds). Writes env.txt,
# pytest.log, gpu.log and the benchmark's solver.md, step.md and syncs.md into OUT.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/gpu-check}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# optional peers carried as wheels (the machine reaches no registry): `.whl/*.whl`, e.g. torchjd
# for the TorchJD rows of the step table (benchmarks/README.md says how to fetch them)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    "$PY" -c 'from importlib.metadata import version; print("torchjd", version("torchjd"))' 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# what is missing here, said once (gradbalance needs numpy and scipy; the CUDA tests pytest;
# Hypothesis is optional for them)
missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("numpy", "scipy", "triton", "pytest", "hypothesis", "torchjd")
               if u.find_spec(m) is None))' 2>&1)
echo "gpu_check: modules missing on this machine: ${missing:-none}" | tee -a "$OUT/env.txt"
if ! "$PY" -c 'import gradbalance' >"$OUT/import.log" 2>&1; then
    tail -5 "$OUT/import.log"
    echo "gpu_check: 'import gradbalance' fails here (see $OUT/import.log): nothing ran"
    exit 3
fi

# the CUDA tests: only the files that carry the cuda marker are collected (collecting all of
# tests/ imports every optional dependency); a module that does not import on this machine
# must not stop the others
mapfile -t cuda_tests < <(grep -rlE "pytest\.mark\.cuda" tests --include='*.py' | sort)
if [[ " $missing " == *" pytest "* ]]; then
    echo "gpu_check: pytest is not installed: the CUDA tests did NOT run (put the wheels of" \
        "pytest, pluggy and iniconfig in .whl/ to run them)" | tee "$OUT/pytest.log"
    tests_rc=127
else
    timeout 240 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider \
        --continue-on-collection-errors "${cuda_tests[@]}" 2>&1 | tee "$OUT/pytest.log"
    tests_rc=${PIPESTATUS[0]}
fi

timeout 270 "$PY" benchmarks/gpu.py --out "$OUT" --budget 150 2>&1 | tee "$OUT/gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: pytest exit $tests_rc (127: not run), gpu.py exit $bench_rc (124: out of its" \
    "time budget); missing: ${missing:-none}"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
