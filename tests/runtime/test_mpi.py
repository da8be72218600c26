import subprocess
import sys
from pathlib import Path

import pytest

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SCRIPT = Path(__file__).with_name("mpi_checks.py")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not installed next to the interpreter")
def test_protocols_under_mpiexec_three_ranks():
    proc = subprocess.run(
        [str(MPIEXEC), "-n", "3", sys.executable, "-m", "mpi4py", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("mpi ok") == 9, proc.stdout
