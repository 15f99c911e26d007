"""benchmarks/gpu_check.sh, the one-command GPU check, on a machine that lacks test tools.

The GPU machine has python3 with a CUDA torch (and Triton), perhaps without pytest or
Hypothesis. The CUDA tests must still be collected without Hypothesis, and a missing pytest
must be reported, not hidden in a traceback. Run here on the CPU with a stand-in ``python3``
whose imports of those modules fail and whose benchmark run is a no-op.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

#: a python3 without the modules in GPU_CHECK_BLOCK; ``benchmarks/gpu.py`` does nothing
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "${1:-}" == "benchmarks/gpu.py" ]]; then echo "(gpu.py not run)"; exit 0; fi
exec "$REAL_PYTHON" -c '
import importlib.util as u, os, runpy, sys
block = set(os.environ["GPU_CHECK_BLOCK"].split())
real = u.find_spec
u.find_spec = lambda name, *a: None if name.split(".")[0] in block else real(name, *a)
for name in block:
    sys.modules[name] = None
args = sys.argv[1:]
if args[0] == "-c":
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<string>", "exec"))
else:
    sys.argv = args[1:]
    runpy.run_module(args[1], run_name="__main__")
' "$@"
"""

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path: Path, block: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "REAL_PYTHON": sys.executable,
        "GPU_CHECK_BLOCK": block,
        # an installed package's pytest plugin would still load through its entry point
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_bash
def test_the_cuda_tests_run_without_hypothesis(tmp_path):
    out = _run(tmp_path, "hypothesis")
    log = (tmp_path / "out" / "pytest.log").read_text()
    assert "error" not in log.lower(), log[-3000:]
    assert "skipped" in log or "passed" in log, log[-3000:]
    assert "missing on this machine: hypothesis" in out.stdout
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@needs_bash
def test_a_missing_pytest_is_reported(tmp_path):
    out = _run(tmp_path, "pytest hypothesis")
    assert "pytest is not installed: the CUDA tests did NOT run" in out.stdout
    assert "pytest exit 127" in out.stdout
    assert out.returncode != 0
