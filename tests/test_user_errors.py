"""What a user who gets something wrong sees, on real MPI ranks: a non-zero exit, exactly one error line
per rank, no traceback, and no share moved; and what a stopped, killed or interrupted rank leaves behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from .test_run_mpi import MPIEXEC, PUMA, TIMEOUT_S, ort_outputs, plain_feeds

pytestmark = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not installed next to the interpreter")

ERROR = "puma-onnx: error: "
CLIENT_REJECTED = "rank 1 (the client) rejected its input; it printed why"


def tiny_model(path: Path, inner: int = 4, opset: int = 18) -> Path:
    """An embedding lookup and a matmul; `inner` other than 4 makes their shapes not fit."""
    table = onnx.numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    weight = onnx.numpy_helper.from_array(np.ones((inner, 3), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["emb"]), helper.make_node("MatMul", ["emb", "weight"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "S", 3])],
        [table, weight],
    )
    path.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path / "model.onnx")
    return path


def no_cache_decoder(path: Path) -> Path:
    """A 1-layer llama-tiny exported by Optimum without its past keys/values (about a second)."""
    from optimum.exporters.onnx import onnx_export_from_model

    from puma_onnx.export import build_torch_model

    onnx_export_from_model(build_torch_model("llama-tiny", layers=1), path, task="text-generation", do_validation=False)
    return path


@pytest.fixture(scope="module")
def bad(exported, tmp_path_factory) -> dict[str, str]:
    """Models and files a user could get wrong, by name."""
    root = tmp_path_factory.mktemp("bad")
    bert = exported("bert-base")
    paths = {"bert": bert, "minilm": exported("minilm"), "gpt2": exported("gpt2")}
    for name, source in (("bare", bert), ("bare_roberta", exported("roberta-base"))):
        (root / name).mkdir()
        os.symlink(source / "model.onnx", root / name / "model.onnx")  # an .onnx file alone: no puma.json
        paths[name] = root / name / "model.onnx"
    for name, meta in (("corrupt", "{not json"), ("mistyped", json.dumps({"max_positions": "512"}))):
        (root / name).mkdir()
        os.symlink(bert / "model.onnx", root / name / "model.onnx")
        (root / name / "puma.json").write_text(meta)
        paths[name] = root / name
    paths["mismatched"] = tiny_model(root / "mismatched", inner=5)
    paths["no_cache"] = no_cache_decoder(root / "no-cache")
    paths["opset99"] = tiny_model(root / "opset99", opset=99)
    np.savez(root / "ids.npz", ids=np.array([1, 2, 3]))
    (root / "ids.txt").write_text("101 2023 102\n")
    np.save(root / "huge.npy", np.array([[101, 2**63 + 5, 102]], dtype=np.uint64))
    np.save(root / "ids.npy", np.array([[1, 2, 3]]))
    np.save(root / "long.npy", np.full((1, 600), 5))
    with open(root / "lying.npy", "wb") as f:  # a header that claims 8 TB of ids, and 16 bytes of them
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (1, 10**12)})
        f.write(np.zeros(2, np.int64).tobytes())
    (root / "a-file").write_text("")
    paths["long"] = " ".join(["word"] * 2000)  # 2002 tokens; the model allows 512
    return {k: str(v) for k, v in {**paths, "root": root}.items()}


# (id, command, arguments with {names} from `bad`, what the line says, who says it: the client alone
# (the others say it rejected its input) or every rank alike)
CASES = [
    ("text-too-long", "run", ["{minilm}", "--text", "{long}"], "the text has 2002 tokens; minilm allows at most 512", "client"),
    ("seq-len-too-long", "run", ["{bert}", "--seq-len", "1000000000"], "--seq-len is 1000000000; bert-base allows at most 512", "client"),
    ("bare-onnx-limit", "run", ["{bare}", "--seq-len", "513"], "--seq-len is 513; model allows at most 512 tokens", "client"),
    ("bare-roberta-limit", "run", ["{bare_roberta}", "--seq-len", "513"], "--seq-len is 513; model allows at most 512 tokens", "client"),
    ("ids-too-many", "run", ["{bert}", "--input-ids", "{root}/long.npy"], "the input has 600 tokens; bert-base allows at most 512", "client"),
    ("ids-header-lies", "run", ["{bert}", "--input-ids", "{root}/lying.npy"], "cannot read --input-ids", "client"),
    ("text-not-utf8", "run", ["{bert}", "--text", "caf\udce9"], "--text is not valid UTF-8", "client"),
    ("ids-npz", "run", ["{bert}", "--input-ids", "{root}/ids.npz"], "is a .npz archive", "client"),
    ("ids-text-file", "run", ["{bert}", "--input-ids", "{root}/ids.txt"], "is not a .npy file", "client"),
    ("ids-above-2^63", "run", ["{bert}", "--input-ids", "{root}/huge.npy"], "token id 9223372036854775813 is outside", "client"),
    ("output-missing-folder", "run", ["{bert}", "--seq-len", "4", "--output", "{root}/nope/out.npz"], "does not exist", "client"),
    ("output-under-proc", "run", ["{bert}", "--seq-len", "4", "--output", "/proc/out.npz"], "cannot be written", "client"),
    ("output-below-a-file", "run", ["{bert}", "--seq-len", "4", "--output", "{root}/a-file/out.npz"], "a-file' is not a folder", "client"),
    ("output-is-the-report", "run", ["{bert}", "--seq-len", "4", "--output", "{root}/x", "--report", "{root}/x"], "both name", "client"),
    ("report-missing-folder", "run", ["{bert}", "--seq-len", "4", "--report", "{root}/nope/r.json"], "does not exist", "client"),
    ("generate-report-missing-folder", "generate", ["{gpt2}", "--input-ids", "{root}/ids.npy", "--report", "{root}/nope/r.json"], "does not exist", "client"),
    ("generate-past-the-positions", "generate", ["{gpt2}", "--input-ids", "{root}/long.npy", "--max-new-tokens", "500"], "the input has 600 tokens; gpt2 allows at most 524 tokens before 500 new ones", "client"),
    ("output-is-a-folder", "run", ["{bert}", "--seq-len", "4", "--output", "{root}"], "is a directory", "all"),
    ("timeout-zero", "run", ["{bert}", "--seq-len", "4", "--timeout", "0"], "Invalid value for '--timeout'", "all"),
    ("puma-json-corrupt", "run", ["{corrupt}", "--seq-len", "4"], "puma.json': Expecting property name", "all"),
    ("puma-json-mistyped", "run", ["{mistyped}", "--seq-len", "4"], "'max_positions' must be a positive integer", "all"),
    ("shapes-do-not-fit", "run", ["{mismatched}", "--seq-len", "4"], "has shapes that do not fit together", "all"),
    ("opset-99", "run", ["{opset99}", "--seq-len", "4"], "uses ONNX opset 99", "all"),
    ("generate-no-new-tokens", "generate", ["{gpt2}", "--input-ids", "{root}/ids.npy", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0", "all"),
    ("generate-without-cache", "generate", ["{no_cache}", "--input-ids", "{root}/ids.npy"], "model was exported without its past keys/values: re-export it", "all"),
]
# Rejected by the command line's parser, before any rank starts its work.
PARSED_BY_CLICK = {"output-is-a-folder", "timeout-zero"}


def arguments(bad: dict, args: list[str]) -> list[str]:
    return [a.format(**bad) for a in args]


def error_lines(stderr: str) -> dict[int, list[str]]:
    """The error lines of each rank (mpiexec -l puts "[rank] " before every line)."""
    lines: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for line in stderr.splitlines():
        if line.startswith("[") and "] " in line:
            rank, text = line[1:].split("] ", 1)
            if text.startswith(ERROR):
                lines[int(rank)].append(text[len(ERROR) :])
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_on_every_rank(bad, case):
    _, command, args, said, who = case
    proc = subprocess.run(
        [MPIEXEC, "-l", "-n", "3", *PUMA, command, *map(os.fsencode, arguments(bad, args))],
        capture_output=True, timeout=TIMEOUT_S,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert all(len(lines[r]) == 1 for r in range(3)), stderr
    if who == "client":
        assert said in lines[1][0], stderr
        # The client's details (its ids, its text, its paths) stay on the client.
        assert lines[0] == lines[2] == [CLIENT_REJECTED], stderr
    else:
        assert all(said in lines[r][0] for r in range(3)), stderr


@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in PARSED_BY_CLICK], ids=lambda c: c[0])
def test_a_user_error_stops_before_any_share_moves(bad, case, monkeypatch):
    """The same command on three thread ranks: every rank raises the user error, and no rank sent
    anything but the key setup and public broadcasts (no weight, no input share, no protocol)."""
    from puma_onnx import cli
    from puma_onnx.runtime import launch as launch_module
    from puma_onnx.runtime.comm import ThreadComm
    from puma_onnx.runtime.generation import generate
    from puma_onnx.runtime.session import UserError, run

    _, command, args, said, _ = case
    taken = {}
    monkeypatch.setattr(launch_module, "launch", lambda opts, command="run": taken.update(opts=opts) or 0)
    with pytest.raises(SystemExit):
        cli.main.main([command, *arguments(bad, args)])
    opts = taken["opts"]
    opts.progress = False
    comms = ThreadComm.group()
    errors = [None] * 3

    def body(rank):
        try:
            (generate if command == "generate" else run)(comms[rank], opts)
        except BaseException as e:  # noqa: BLE001 - collected and checked below
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert all(isinstance(e, UserError) for e in errors), errors
    assert said in str(errors[1])
    for comm in comms:
        assert set(comm.stats.by_path()) <= {"setup", "untagged"}, comm.stats.by_path()


def test_a_seven_token_text_runs_as_seven_tokens_and_the_output_keeps_its_name(bad, tmp_path):
    """No padding: the report's input shape is the text's own; --output is written under its exact name."""
    text = "The prompt stays secret."
    out, report = tmp_path / "result.bin", tmp_path / "report.json"
    proc = subprocess.run(
        [MPIEXEC, "-n", "3", *PUMA, "run", bad["minilm"], "--text", text, "--output", str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(report.read_text())["inputs"]["input_ids"] == [1, 7]
    assert out.exists() and not Path(f"{out}.npz").exists()
    assert f"(in {out})" in proc.stdout
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(bad["minilm"]) / "tokenizer.json"))
    tokenizer.no_padding()
    ids = np.array([tokenizer.encode(text).ids])
    want = ort_outputs(Path(bad["minilm"]) / "model.onnx", plain_feeds(ids))["sentence_embedding"]
    got = np.load(out)["sentence_embedding"]
    assert got.shape == want.shape == (1, 384)
    assert np.abs(got - want).max() < 0.05


def test_truncate_cuts_a_long_text_and_says_so(bad, capsys):
    from puma_onnx.runtime.session import RunOptions, UserError, load_model, read_ids

    _, info, _, _ = load_model(bad["minilm"])
    info = {**info, "max_positions": 8}
    with pytest.raises(UserError, match="the text has 2002 tokens; minilm allows at most 8"):
        read_ids(RunOptions(model="", text=bad["long"]), info)
    assert capsys.readouterr().err == ""
    ids, mask, _ = read_ids(RunOptions(model="", text=bad["long"], truncate=True), info)
    assert ids.shape == mask.shape == (1, 8)
    assert ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP]: the cut keeps the special tokens
    assert "the text has 2002 tokens; kept the first 8 (--truncate)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stopped, killed, interrupted


class Job:
    """`mpiexec -l -n 3 puma-onnx run ...` in the background, its stderr in a file, its ranks' pids."""

    def __init__(self, tmp_path: Path, args: list[str], flags: tuple[str, ...] = ()):
        self.marker = uuid.uuid4().hex
        self.stderr = tmp_path / "stderr.txt"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [MPIEXEC, *flags, "-l", "-n", "3", *PUMA, "run", *args],
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PUMA_ONNX_TEST_JOB": self.marker},
                start_new_session=True,
            )

    def text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for(self, said: str) -> None:
        """Until the job's stderr says `said` (every rank is inside MPI by then)."""
        deadline = time.monotonic() + TIMEOUT_S
        while said not in self.text():
            assert self.proc.poll() is None, f"the job ended first: {self.text()}"
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.02)

    def pid(self, rank: int) -> int:
        for entry in Path("/proc").iterdir():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"PUMA_ONNX_TEST_JOB={self.marker}".encode() in env and f"PMI_RANK={rank}".encode() in env:
                return int(entry.name)
        raise AssertionError(f"rank {rank} not found")

    def finish(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return code, self.text()


# The owner says this right after it loaded the model (2-layer registry exports record no ranges):
# from then on every rank is inside MPI, mid-setup.
LOADED = "has no recorded activation ranges"


def started(tmp_path, bad, *extra, flags=()) -> Job:
    job = Job(tmp_path, [bad["bert"], "--seq-len", "128", *extra], flags)
    job.wait_for(LOADED)
    return job


def test_a_stopped_rank_ends_the_job_with_the_liveness_line(bad, tmp_path):
    job = started(tmp_path, bad, "--timeout", "4")
    os.kill(job.pid(2), signal.SIGSTOP)
    code, stderr = job.finish()
    assert code != 0
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines[0]) == len(lines[1]) == 1 and lines[2] == [], stderr
    assert all("heard nothing from" in lines[r][0] and "for 4 s" in lines[r][0] for r in (0, 1)), stderr
    # The silent rank is named: by the rank that waited for it, or by the rank that was told while it
    # waited for it (when that rank's own silence made the third time out first).
    said = " ".join(lines[0] + lines[1])
    assert re.search(r"heard nothing from rank 2 for 4 s|was waiting for rank 2\)", said), stderr
    assert not re.search(r"heard nothing from rank \d and rank \d", said), stderr  # only the pending peer


def test_a_terminated_rank_is_one_line_on_every_rank(bad, tmp_path):
    job = started(tmp_path, bad)
    os.kill(job.pid(2), signal.SIGTERM)
    code, stderr = job.finish()
    assert code != 0 and "Traceback" not in stderr
    lines = error_lines(stderr)
    assert lines[2] == ["rank 2 stopped (signal 15); the job was aborted"], stderr
    assert lines[0] == ["rank 0: rank 2 stopped (signal 15); the job was aborted"], stderr
    assert lines[1] == ["rank 1: rank 2 stopped (signal 15); the job was aborted"], stderr


def test_ctrl_c_is_one_line_on_every_rank(bad, tmp_path):
    job = started(tmp_path, bad)
    os.kill(job.proc.pid, signal.SIGINT)  # what the terminal sends mpiexec; it forwards it to every rank
    code, stderr = job.finish()
    assert code != 0 and "Traceback" not in stderr
    lines = error_lines(stderr)
    for rank in range(3):
        assert len(lines[rank]) == 1 and "stopped (signal 2); the job was aborted" in lines[rank][0], stderr


def test_a_killed_rank_ends_the_job_and_survivors_say_so_in_one_line(bad, tmp_path):
    """SIGKILL cannot be caught: by default mpiexec kills the other ranks at once (and prints its own
    banner); with -disable-auto-cleanup it signals them, and each says so in one line. MPICH may still
    end a survivor that was inside a transfer (a race measured with bare mpi4py too), so the promise
    is: the job ends, nothing but the right line on any rank, no traceback."""
    job = started(tmp_path, bad, flags=("-disable-auto-cleanup",))
    os.kill(job.pid(2), signal.SIGKILL)
    code, stderr = job.finish()
    assert code != 0 and "Traceback" not in stderr
    lines = error_lines(stderr)
    assert lines[2] == [], stderr
    for rank in (0, 1):
        assert len(lines[rank]) <= 1, stderr
        assert all(re.fullmatch(rf"rank {rank} heard from mpiexec that another rank died; the job was aborted"
                                rf"|rank {rank} lost .*", line) for line in lines[rank]), stderr


def test_news_of_a_dead_rank_is_one_line_on_every_rank(bad, tmp_path):
    """What -disable-auto-cleanup's mpiexec sends every survivor (SIGUSR1), here to all three ranks of a
    healthy job, so that no MPI transfer can fail first: each says so, in one line, and the job ends."""
    job = started(tmp_path, bad)
    for rank in range(3):
        os.kill(job.pid(rank), signal.SIGUSR1)
    code, stderr = job.finish()
    assert code != 0 and "Traceback" not in stderr
    lines = error_lines(stderr)
    for rank in range(3):
        assert lines[rank] == [f"rank {rank} heard from mpiexec that another rank died; the job was aborted"], stderr
