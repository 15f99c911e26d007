"""Smoke tests of the benchmark scripts: they run end to end and print their tables.

Nothing here checks a timing; the scripts run in a subprocess with small settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 240) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _table_rows(out: str, header: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_step_benchmark_quick(tmp_path):
    csv_path = tmp_path / "step.csv"
    out = _run("benchmarks/step.py", "--quick", "--csv", str(csv_path))
    rows = _table_rows(out, "| model | K | method | engine |")
    by_key = {(r[2], r[3]): r for r in rows}
    plain = by_key[("plain", "-")]
    assert plain[:2] == ["mlp", "2"] and float(plain[5]) == 1.0
    for key in [
        ("equal", "-"),
        ("mgda", "loop"),
        ("mgda", "batched"),
        ("mgda-ub", "representation"),
    ]:
        row = by_key[key]
        assert float(row[4]) > 0 and float(row[5]) > 0, row  # time measured
        assert float(row[6]) > 0, row  # peak memory measured
    # MGDA holds a K x P Jacobian that a plain step never allocates
    assert float(by_key[("mgda", "loop")][6]) > float(plain[6])
    assert "Goals:" in out
    assert csv_path.read_text().startswith("model,K,method,engine,ms,ratio")


def test_step_benchmark_rejects_unknown_method():
    proc = subprocess.run(
        [sys.executable, "benchmarks/step.py", "--quick", "--methods", "no-such-method"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown methods ['no-such-method']" in proc.stderr


def test_solver_benchmark_small():
    out = _run(
        "benchmarks/solver.py", "--ks", "2", "4", "--n", "3", "--repeats", "1", "--budget", "2"
    )
    rows = _table_rows(out, "| method | K | n |")
    ours = [r for r in rows if r[0] == "gradbalance"]
    assert [r[1] for r in ours] == ["2", "4"]
    assert all(float(r[5]) < 1e-9 for r in ours)  # relative duality gap of min_norm


def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.py --device cpu --quick writes its three tables; the sync table's
    device-skip column shows no host read for equal (the CUDA path, run on the CPU)."""
    out = tmp_path / "gpu"
    _run("benchmarks/gpu.py", "--device", "cpu", "--quick", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["solver.md", "step.md", "syncs.md"]
    step = (out / "step.md").read_text()
    rows = _table_rows(step, "| model | K | method |")
    methods = {r[2] for r in rows}
    assert {"plain", "equal", "mgda (parameters)", "mgda (representation)", "upgrad"} <= methods
    syncs = _table_rows((out / "syncs.md").read_text(), "| method |")
    by_method = {r[0]: r for r in syncs}
    assert by_method["equal"][1] == "0" and int(by_method["equal"][4]) > 0
