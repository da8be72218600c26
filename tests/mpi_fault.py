"""Run under mpiexec -n 3: rank 2 raises while ranks 0 and 1 wait for it; launch() must abort the job."""

from puma_onnx.runtime import launch
from puma_onnx.runtime.session import RunOptions


def fake_run(comm, opts):
    if comm.rank == 2:
        raise RuntimeError("injected fault")
    comm.exchange({}, {2: ((1,), "int64")})  # would wait forever without the abort


launch.run = fake_run
launch.launch(RunOptions(model="unused", seq_len=1))
