"""Mutation check: do the fast tests notice plausible faults? Not part of the default suite.

    .venv/bin/python tests/mutation/run.py [--repo DIR] [--only N ...] [--list]

Copies the repository (default: the one holding this file; --repo another checkout, e.g. a
`git worktree` of an older commit) into a temporary folder, never touching the original, then
applies each mutant of `mutants.MUTANTS` alone and runs the thread-backend tests of `TESTS` that
exist there, stopping at the first failure. A mutant is killed when the tests fail, survives when
they pass. Prints one line per mutant and the score. The unmutated copy must pass first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS  # noqa: E402

# Fast tests only (thread backend, no export, no MPI): a few seconds per mutant. Killers first.
TESTS = [
    "tests/runtime/test_approx.py",
    "tests/runtime/test_attributes.py",
    "tests/runtime/test_nonlinear.py",
    "tests/runtime/test_kernels.py",
    "tests/runtime/test_arith.py",
    "tests/runtime/test_chain.py",
    "tests/runtime/test_compare.py",
    "tests/runtime/test_weights.py",
    "tests/runtime/test_store.py",
    "tests/runtime/test_comm.py",
    "tests/runtime/test_ranges.py",
    "tests/runtime/test_byte_limbs.py",
    "tests/runtime/test_embedding.py",
    "tests/runtime/test_prg.py",
    "tests/runtime/test_prepared.py",
    "tests/passes/test_functions.py",
    "tests/passes/test_layer_norm.py",
    "tests/passes/test_rms_norm.py",
    "tests/passes/test_softmax.py",
    "tests/passes/test_gelu.py",
    "tests/passes/test_silu.py",
]
# Installed as puma_onnx.<name> (pyproject's package-dir); linked so the copy imports its own code.
SUBPACKAGES = ("runtime", "passes", "models")
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "out", "build")


def copy_repo(repo: Path, into: Path) -> Path:
    copy = into / "repo"
    shutil.copytree(repo, copy, ignore=IGNORE, symlinks=True)
    for name in SUBPACKAGES:
        (copy / "puma_onnx" / name).symlink_to(Path("..") / name)
    return copy


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[bool, float, str]:
    """(passed, seconds, last line of pytest's output)."""
    # No bytecode: a mutant that keeps the file's size within the same second would otherwise load a stale .pyc.
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(copy), *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return done.returncode == 0, time.perf_counter() - start, lines[-1] if lines else done.stderr.strip()[-200:]


def imports_the_copy(copy: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    probe = "import puma_onnx.runtime.approx as a, puma_onnx.passes as p; print(a.__file__); print(p.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True).stdout
    return all(line.startswith(str(copy)) for line in out.split()) and bool(out.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--only", type=int, nargs="*", help="mutant numbers (from 1) to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per test run")
    args = parser.parse_args()
    if args.list:
        for i, (path, _, _, why) in enumerate(MUTANTS, 1):
            print(f"{i:3d}  {path:24s} {why}")
        return 0
    chosen = args.only or range(1, len(MUTANTS) + 1)
    with tempfile.TemporaryDirectory(prefix="puma-mutation-") as tmp:
        copy = copy_repo(args.repo.resolve(), Path(tmp))
        if not imports_the_copy(copy):
            print("the copy does not import its own puma_onnx: aborting", file=sys.stderr)
            return 2
        tests = [t for t in TESTS if (copy / t).exists()]
        ok, seconds, summary = run_tests(copy, tests, args.timeout * 3)
        print(f"unmutated: {len(tests)} test files, {summary} ({seconds:.0f} s)")
        if not ok:
            print("the unmutated copy fails its tests: aborting", file=sys.stderr)
            return 2
        killed, ran = 0, 0
        for i in chosen:
            path, old, new, why = MUTANTS[i - 1]
            target = copy / path
            original = target.read_text()
            if original.count(old) != 1:
                print(f"{i:3d}  NOT APPLICABLE  {path}: the old text occurs {original.count(old)} times  ({why})")
                continue
            target.write_text(original.replace(old, new))
            try:
                passed, seconds, summary = run_tests(copy, tests, args.timeout)
            finally:
                target.write_text(original)
            ran += 1
            killed += not passed
            verdict = "survived" if passed else "killed  "
            print(f"{i:3d}  {verdict}  {seconds:5.1f} s  {path}: {why}  [{summary}]", flush=True)
        print(f"score: {killed}/{ran} killed ({100.0 * killed / max(ran, 1):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
