"""Before/after table of ``benchmarks/step.py``: two versions of the package, alternated.

Why: on a shared 2-core machine the speed drifts between two runs of ``step.py`` by more than
the effect a renovation must stay under (issue 13: "no cell more than 3 % slower"); a single
pair of runs, one right after the other, moves the ``checked-sum`` reference (which runs no
gradbalance code) by -5 % to +12 % (see ``benchmarks/README.md``). This script runs the two
versions several times, alternating them (round 1: before then after; round 2: after then
before; ...), so that a drift hits both alike, and compares medians over the rounds.

Both versions run the same ``step.py`` file (the one of the "after" tree), so only the package
differs. Each run is a fresh ``python`` process that drops the editable-install finder from
``sys.meta_path``, puts the version's tree first on ``sys.path`` and checks that
``gradbalance`` is imported from that tree, with ``OMP_NUM_THREADS=MKL_NUM_THREADS=1``. Before
the rounds, a cheap probe (``--reps 1`` at the smallest ``K``) runs both versions; if the
"after" ``step.py`` fails on the "before" package (it needs some newer name), every version
runs its own ``step.py`` instead, and the output says so. The "before" version is a commit,
checked out with ``git worktree add --detach`` in a temporary folder and removed at the end
(also on an error or Ctrl-C); the "after" version is this checkout by default (uncommitted
changes included), or another folder, or a commit.

Usage (everything after ``--`` goes to ``step.py``; ``--csv`` is added by this script)::

    python benchmarks/compare.py --before 68d3cd2 --rounds 4 -- --models mlp segnet \\
        --k 2 8 --methods equal uncertainty gradnorm mgda mgda-ub upgrad checked-sum \\
        --reps 40 --threads 1
    python benchmarks/compare.py --before HEAD --rounds 2 --markdown -- --quick

Columns, one row per cell (model, K, method, engine), medians over the rounds:

- ``before ms`` / ``after ms``: the step time (``step.py``'s median over its repetitions);
- ``after/before ms``: the median of the per-round ratio of the two step times (moves with the
  machine's speed between the two runs of a round);
- ``before × plain`` / ``after × plain``: the step time over the plain summed-loss step of the
  same run (``step.py``'s ``time / plain``);
- ``ratio``: the median over the rounds of (after × plain) / (before × plain) of the same
  round: the number the 3 % bound is about (above 1: the after version is slower);
- ``min`` / ``max``: the smallest and largest per-round value of that ratio: the noise.

Below the table: the median of ``ratio`` over the cells (plain rows left out, their ratio is 1
by definition), the worst cell, and the cells above ``--bound`` (default 1.03).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEP = Path("benchmarks") / "step.py"
PLAIN = "plain"

#: the child: no editable finder, the tree first on sys.path, gradbalance from that tree
RUNNER = """\
import runpy, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
root, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
sys.argv = [script, *sys.argv[3:]]
import gradbalance
if not gradbalance.__file__.startswith(root + "/"):
    raise SystemExit(f"gradbalance imported from {gradbalance.__file__}, not from {root}")
runpy.run_path(script, run_name="__main__")
"""

Cell = tuple[str, int, str, str]
Rows = dict[Cell, tuple[float, float]]


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A detached worktree of ``commit`` in a temporary folder, removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="gb-compare-"))
    path = tmp / "tree"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)],
            cwd=REPO,
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def describe(tree: Path) -> str:
    """The tree's commit, and whether it has uncommitted changes."""
    head = git("rev-parse", "--short", "HEAD", cwd=tree)
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=tree)
    return f"{head} + uncommitted changes" if dirty else head


def run_step(tree: Path, script: Path, step_args: list[str], csv_path: Path) -> Rows | None:
    """One ``step.py`` run against ``tree``'s package; the timed cells, or ``None`` on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-c", RUNNER, str(tree.resolve()), str(script)]
    with subprocess.Popen(
        [*cmd, *step_args, "--csv", str(csv_path)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:  # step.py's progress lines, passed on
            print(f"    {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        print(f"  step.py failed against {tree} (exit {proc.returncode})", file=sys.stderr)
        return None
    rows: Rows = {}
    with open(csv_path, newline="") as fh:
        for r in csv.DictReader(fh):
            if r.get("ms") and r.get("ratio"):
                cell = (r["model"], int(r["K"]), r["method"], r["engine"])
                rows[cell] = (float(r["ms"]), float(r["ratio"]))
    return rows


def probe_args(step_args: list[str]) -> list[str]:
    """The same run at its cheapest: one repetition, the smallest K (argparse: last one wins)."""
    extra = ["--reps", "1", "--warmup", "1"]
    ks = []
    if "--k" in step_args:
        for a in step_args[step_args.index("--k") + 1 :]:
            if a.startswith("-"):
                break
            ks.append(int(a))
    if ks:
        extra += ["--k", str(min(ks))]
    return [*step_args, *extra]


def choose_scripts(
    before: Path, after: Path, step_args: list[str], tmp: Path
) -> tuple[Path, Path, str]:
    """The step.py each version runs: the after tree's for both, unless the probe says no."""
    shared = after / STEP
    args = probe_args(step_args)
    print("probe: one repetition of each version ...", file=sys.stderr, flush=True)
    got_after = run_step(after, shared, args, tmp / "probe-after.csv")
    if got_after is None:
        raise SystemExit("step.py fails against the after version: nothing to compare")
    got_before = run_step(before, shared, args, tmp / "probe-before.csv")
    if got_before is not None and set(got_after) <= set(got_before):
        return shared, shared, f"both versions run {STEP} of the after tree"
    if not (before / STEP).exists():
        raise SystemExit(f"step.py fails on the before version, which has no {STEP} of its own")
    note = f"each version runs its own {STEP} (the after tree's fails on the before package"
    if got_before is not None:
        note += f"; cells missing: {sorted(set(got_after) - set(got_before))}"
    note += ")"
    print(note, file=sys.stderr)
    return before / STEP, shared, note


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: dict[str, list[Rows]]) -> list[dict]:
    """One dict per cell timed in every round by both versions."""
    rounds = len(runs["before"])
    cells = [c for c in runs["after"][0] if all(c in r for side in runs.values() for r in side)]
    out = []
    for cell in cells:
        b = [runs["before"][i][cell] for i in range(rounds)]
        a = [runs["after"][i][cell] for i in range(rounds)]
        per_round = [ai[1] / bi[1] for ai, bi in zip(a, b)]
        out.append(
            {
                "model": cell[0],
                "K": cell[1],
                "method": cell[2],
                "engine": cell[3],
                "before_ms": _median([x[0] for x in b]),
                "after_ms": _median([x[0] for x in a]),
                "ms_ratio": _median([ai[0] / bi[0] for ai, bi in zip(a, b)]),
                "before_x": _median([x[1] for x in b]),
                "after_x": _median([x[1] for x in a]),
                "ratio": _median(per_round),
                "min": min(per_round),
                "max": max(per_round),
            }
        )
    return out


HEADERS = [
    "model", "K", "method", "engine", "before ms", "after ms", "after/before ms",
    "before × plain", "after × plain", "ratio", "min", "max",
]  # fmt: skip


def _cells(r: dict) -> list[str]:
    return [
        r["model"], str(r["K"]), r["method"], r["engine"],
        f"{r['before_ms']:.2f}", f"{r['after_ms']:.2f}", f"{r['ms_ratio']:.3f}",
        f"{r['before_x']:.2f}", f"{r['after_x']:.2f}",
        f"{r['ratio']:.3f}", f"{r['min']:.3f}", f"{r['max']:.3f}",
    ]  # fmt: skip


def print_table(rows: list[dict], markdown: bool) -> None:
    body = [_cells(r) for r in rows]
    if markdown:
        print("| " + " | ".join(HEADERS) + " |")
        print("|---|---:|---|---|" + "---:|" * (len(HEADERS) - 4))
        for line in body:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(HEADERS)]
    left = 4  # model, K, method, engine: left-aligned
    for line in [HEADERS, *body]:
        print(
            "  ".join(
                c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
            ).rstrip()
        )


def print_summary(rows: list[dict], bound: float) -> None:
    rated = [r for r in rows if r["method"] != PLAIN]
    if not rated:
        return
    worst = max(rated, key=lambda r: r["ratio"])
    over = [r for r in rated if r["ratio"] > bound]
    print()
    print(
        f"median ratio over {len(rated)} cells (plain rows left out): "
        f"{statistics.median(r['ratio'] for r in rated):.3f}"
    )
    print(
        f"worst cell: {worst['model']} K={worst['K']} {worst['method']} {worst['engine']}: "
        f"{worst['ratio']:.3f} (rounds {worst['min']:.3f} to {worst['max']:.3f})"
    )
    names = ", ".join(f"{r['model']} K={r['K']} {r['method']} {r['engine']}" for r in over)
    print(f"cells above {bound:.2f}: {len(over)}{': ' + names if over else ''}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    step_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, step_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s --before COMMIT [--after PATH|COMMIT] [--rounds N] -- STEP.PY ARGS",
    )
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument(
        "--after", default=str(REPO), help="a folder (default: this checkout) or a commit"
    )
    parser.add_argument("--rounds", type=int, default=4, help="runs of each version (ABBA...)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--bound", type=float, default=1.03, help="the ratio to flag cells above")
    parser.add_argument("--save", default=None, help="keep every run's CSV in this folder")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if "--load" in step_args or "--csv" in step_args:
        parser.error("step.py's --load and --csv are this script's business")
    with tempfile.TemporaryDirectory(prefix="gb-compare-csv-") as tmp_name:
        tmp = Path(tmp_name)
        save = Path(args.save) if args.save else tmp
        save.mkdir(parents=True, exist_ok=True)
        with worktree(args.before) as before:
            if Path(args.after).is_dir():
                compare(before, Path(args.after).resolve(), step_args, args, tmp, save)
            else:
                with worktree(args.after) as after:
                    compare(before, after, step_args, args, tmp, save)


def compare(
    before: Path,
    after: Path,
    step_args: list[str],
    args: argparse.Namespace,
    tmp: Path,
    save: Path,
) -> None:
    """Probe, run the rounds (before/after, then after/before, ...), print the table."""
    before_script, after_script, scripts_note = choose_scripts(before, after, step_args, tmp)
    trees = {"before": before, "after": after}
    scripts = {"before": before_script, "after": after_script}
    runs: dict[str, list[Rows]] = {"before": [], "after": []}
    t0 = time.perf_counter()
    for i in range(args.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for side in order:
            print(f"round {i + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
            got = run_step(trees[side], scripts[side], step_args, save / f"{side}-{i + 1}.csv")
            if got is None:
                raise SystemExit(f"step.py failed in round {i + 1} ({side})")
            runs[side].append(got)
        print(f"  {time.perf_counter() - t0:.0f} s so far", file=sys.stderr, flush=True)
    print(
        f"# benchmarks/step.py, before {args.before} ({describe(before)}) vs after "
        f"{describe(after)}; {args.rounds} rounds, alternated; {scripts_note}; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(f"# step.py {' '.join(step_args)}")
    print()
    table = summarize(runs)
    print_table(table, args.markdown)
    print_summary(table, args.bound)
    shown = {(r["model"], r["K"], r["method"], r["engine"]) for r in table}
    seen = {cell for side in runs.values() for got in side for cell in got}
    if seen - shown:
        left = ", ".join(" ".join(map(str, c)) for c in sorted(seen - shown))
        print(f"left out (not timed in every run of both versions): {left}")


if __name__ == "__main__":
    main()
