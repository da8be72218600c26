"""`mpirun -n 3 puma-onnx serve` with clients outside the ranks, over HTTPS: answers match onnxruntime
for concurrent clients and batches, bad queries get error replies and the service goes on, SIGTERM
stops all three ranks with exit code 0, and a dead rank ends the service."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
PUMA = [sys.executable, "-m", "puma_onnx"]
START_S = 240

pytestmark = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not installed next to the interpreter")

TEXTS = [
    ["A sentence to embed."],
    ["Short", "A much longer sentence about private inference of transformers.", "Third one here", "Four"],
    ["Completely different words for the third client"],
]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the test's own CA: the client trusts this file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "puma-onnx test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


class Service:
    """A running `puma-onnx serve`; its stderr is collected line by line."""

    def __init__(
        self, folder: Path, *extra: str, tls: tuple[Path, Path] | None = None, hosts=None
    ):
        self.ports = free_ports(3)
        addresses = hosts.addresses if hosts else ["127.0.0.1"] * 3
        self.servers = [f"{a}:{p}" for a, p in zip(addresses, self.ports)]
        listen = [a for s in self.servers for a in ("--listen", s)]
        tls_args = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []
        spread = hosts.mpiexec_args() if hosts else []
        self.proc = subprocess.Popen(
            [MPIEXEC, *spread, "-n", "3", *PUMA, "serve", str(folder), *listen, *tls_args, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, words: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(words in line for line in self.lines) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {count} lines with {words!r}:\n" + "".join(self.lines)[-3000:])
            time.sleep(0.1)

    def rank_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"puma_onnx serve .*{self.ports[0]}"], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if int(p) != self.proc.pid]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def minilm(exported):
    return exported("minilm")


@pytest.fixture(scope="module")
def rewritten(minilm, tmp_path_factory):
    """The rewritten model onnxruntime runs: the same approximations as the secure run."""
    from puma_onnx.passes import rewrite_file

    path = tmp_path_factory.mktemp("rewritten") / "model.puma.onnx"
    rewrite_file(minilm / "model.onnx", path)
    return path


@pytest.fixture(scope="module")
def service(minilm, tmp_path_factory):
    tls = self_signed(tmp_path_factory.mktemp("tls"))
    svc = Service(minilm, "--max-batch", "8", "--query-wait", "2", "--batch-window", "4", tls=tls)
    svc.ca = str(tls[0])
    try:
        svc.wait_for(" serves ", 3, START_S)
        yield svc
    finally:
        svc.kill()


@pytest.fixture(scope="module")
def reference(minilm, rewritten):
    """reference(texts): onnxruntime's outputs on the rewritten model, one text at a time."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    session = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def rows(texts: list[str]) -> list[dict]:
        out = []
        for text in texts:
            ids = np.array([tokenizer.encode(text).ids])
            out.append(dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)}))))
        return out

    return rows


def test_three_concurrent_clients_each_get_their_own_answer(service, reference):
    from puma_onnx import Client

    with Client(service.servers, ca=service.ca) as client:
        assert client.model["name"] == "minilm" and client.model["max_batch"] == 8
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda texts: client.query(client.tokenize(texts)), TEXTS))
        vectors = client.embed(TEXTS[1])
    for texts, answer in zip(TEXTS, answers):
        want = reference(texts)
        got = answer.outputs
        assert got["token_embeddings"].shape[0] == len(texts)
        for b, w in enumerate(want):
            n = w["token_embeddings"].shape[1]
            assert np.abs(got["token_embeddings"][b, :n] - w["token_embeddings"][0]).max() <= 2e-3
            assert np.abs(got["sentence_embedding"][b] - w["sentence_embedding"][0]).max() <= 2e-4
        # They arrived together: one batch of 6 inputs, padded to the longest.
        assert answer.batch["queries"] == 3 and answer.batch["inputs"] == 6, answer.batch
    want = np.stack([w["sentence_embedding"][0] for w in reference(TEXTS[1])])
    assert np.abs(vectors - want).max() <= 2e-4


def test_a_bad_query_gets_an_error_reply_and_the_next_one_succeeds(service, reference):
    import httpx

    from puma_onnx import Client
    from puma_onnx.client import ServiceError

    for server in service.servers:  # not JSON
        verify = ssl.create_default_context(cafile=service.ca)
        reply = httpx.post(f"https://{server}/v1/run", files={"meta": (None, "{oops")}, verify=verify)
        assert reply.status_code == 400 and "malformed query" in reply.json()["error"]
    with Client(service.servers, ca=service.ca) as client:
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 30522\)"):
            client.run({"input_ids": np.array([[101, 30522, 102]])})
        with pytest.raises(ValueError, match="allows at most 512"):
            client.run({"input_ids": np.ones((1, 513), np.int64)})
        # A share of the wrong size on rank 1: every rank drops the query with rank 1's reason.
        real = client._http[1].post

        def short_share(url, files):
            files["share"] = ("share", files["share"][1][:-8], "application/octet-stream")
            return real(url, files=files)

        client._http[1].post = short_share
        with pytest.raises(ServiceError, match="uint64 words"):
            client.run({"input_ids": np.array([[101, 2000, 102]])})
        client._http[1].post = real
        got = client.run({"input_ids": np.array([[101, 2000, 102]])})
    want = reference(["to"])  # [CLS] to [SEP]
    assert np.abs(got["sentence_embedding"] - want[0]["sentence_embedding"]).max() <= 2e-4


def test_a_query_missing_on_one_rank_times_out_and_a_client_that_leaves_does_not_stop_the_service(service):
    import httpx

    from puma_onnx import Client
    from puma_onnx.client import ServiceError

    with Client(service.servers, ca=service.ca) as client:
        real = client._http[2].post
        client._http[2].post = lambda url, files: httpx.Response(599, json={"error": "not sent"})
        with pytest.raises(ServiceError, match=r"did not receive the query within 2 s"):
            client.run({"input_ids": np.array([[101, 102]])})
        client._http[2].post = real
        # A client that gives up at once: its query still runs, and nobody waits for it.
        impatient = Client(service.servers, ca=service.ca)
        for http in impatient._http:
            http.timeout = httpx.Timeout(0.05)
        with pytest.raises(httpx.TimeoutException):
            impatient.run({"input_ids": np.array([[101, 2023, 102]])})
        impatient.close()
        assert client.run({"input_ids": np.array([[101, 2023, 102]])})["sentence_embedding"].shape == (1, 384)
    assert service.proc.poll() is None


def test_the_query_command_writes_the_outputs(service, reference, tmp_path):
    out = tmp_path / "out.npz"
    proc = subprocess.run(
        [*PUMA, "query", "--servers", ",".join(service.servers), "--tls-ca", service.ca, "--text", "A sentence to embed.",
         "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "answered: token_embeddings (1, 8, 384)" in proc.stderr
    want = reference(["A sentence to embed."])[0]
    assert np.abs(np.load(out)["sentence_embedding"] - want["sentence_embedding"]).max() <= 2e-4
    bad = subprocess.run([*PUMA, "query", "--servers", ",".join(service.servers), "--tls-ca", service.ca],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "give --text" in bad.stderr


def test_sigterm_stops_all_three_ranks_with_exit_code_0(minilm):
    svc = Service(minilm)
    try:
        svc.wait_for(" serves ", 3, START_S)
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=30) == 0, "".join(svc.lines)[-3000:]
        svc._reader.join(timeout=5)
        assert sum("stopped after 0 queries" in line for line in svc.lines) == 3
    finally:
        svc.kill()


def test_a_rank_that_dies_ends_the_service_with_an_error(minilm):
    svc = Service(minilm)
    try:
        svc.wait_for(" serves ", 3, START_S)
        pids = svc.rank_pids()
        assert len(pids) >= 3, pids
        os.kill(max(pids), signal.SIGKILL)
        assert svc.proc.wait(timeout=60) != 0
    finally:
        svc.kill()


def test_three_hosts_in_network_namespaces_give_the_answer_of_one_host(minilm, reference, tmp_path):
    """Each rank in a network namespace of its own address (mpiexec -hosts with a launcher that enters
    it); the client, outside, reaches each rank at its address."""
    from tests.netns import Hosts, can_make_namespaces

    from puma_onnx import Client

    why = can_make_namespaces()
    if why:
        pytest.skip(why)
    hosts = Hosts(tmp_path)
    svc = None
    try:
        svc = Service(minilm, hosts=hosts)
        svc.wait_for(" serves ", 3, START_S)
        for rank, address in enumerate(hosts.addresses):
            assert any(f"rank {rank} serves minilm at http://{address}:" in line for line in svc.lines), svc.lines
        with Client(svc.servers) as client:
            got = client.embed(TEXTS[1])
        want = np.stack([w["sentence_embedding"][0] for w in reference(TEXTS[1])])
        assert np.abs(got - want).max() <= 2e-4
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=30) == 0
    finally:
        if svc is not None:
            svc.kill()
        hosts.close()


def test_a_decoder_service_generates_the_greedy_ids_for_a_client_outside(exported, tmp_path):
    """`Client.generate` and `query --max-new-tokens` against a llama-tiny service: the ids of the
    plaintext greedy loop, streamed; an encoder-only request is refused with a reason."""
    import json

    from puma_onnx import Client
    from puma_onnx.export import prepare
    from puma_onnx.plaintext import generate as plaintext_generation

    folder = exported("llama-tiny")
    prepare(folder, warn=lambda msg: None)
    ids = np.random.default_rng(9).integers(3, 1000, size=(1, 6), dtype=np.int64)
    want, _ = plaintext_generation(folder / "model.puma.onnx", ids, 5)
    svc = Service(folder)
    try:
        svc.wait_for(" serves ", 3, START_S)
        with Client(svc.servers) as client:
            assert client.model["decoder"] and client.model["padding_side"] == "left"
            answer = client.generate(ids[0], max_new_tokens=5)
            assert answer["new_ids"] == want and answer["prompt_ids"] == ids[0].tolist()
            assert answer["cost"]["new_tokens"] == 5 and answer["cost"]["bytes"] > 0
            with pytest.raises(ValueError, match="before 5 new ones"):
                client.generate(np.ones(client.model["max_positions"], np.int64), max_new_tokens=5)
            # A run query on a decoder gives the last position's logits, as `run` does.
            logits = client.run({"input_ids": ids})["logits"]
            assert logits.shape[:2] == (1, 1) and int(np.argmax(logits)) == want[0]
        np.save(tmp_path / "ids.npy", ids)
        out = tmp_path / "answer.json"
        proc = subprocess.run(
            [*PUMA, "query", "--servers", ",".join(svc.servers), "--input-ids", str(tmp_path / "ids.npy"),
             "--max-new-tokens", "5", "--output", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text())["new_ids"] == want and "5 new tokens after 6" in proc.stderr
        svc.proc.send_signal(signal.SIGINT)  # Ctrl-C on mpirun stops the service as SIGTERM does
        assert svc.proc.wait(timeout=30) == 0, "".join(svc.lines)[-3000:]
    finally:
        svc.kill()
