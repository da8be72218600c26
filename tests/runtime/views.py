"""What one rank sees, and whether it depends on the secret.

A rank's view of a protocol run is every word it receives plus the shares it ends with. The
view test (`leaks`) holds the observer's own state fixed: its keys (`Party.held_keys`) and its
own shares of the secret inputs. It redraws every key it does not hold on each run, and runs
the protocol on two different secrets. In a secure protocol each received word is then either a
constant (a function of the observer's fixed state and public data) or masked by a key the
observer lacks, so its distribution is the same under both secrets. A word that unmasks a share,
however, becomes a fixed, secret-dependent value: its bits split the two samples perfectly.

The statistic: for every bit of the view and of derived words (the differences and XORs of every
pair of its 64-bit words, which catch a mask used for two words of any messages), the number of runs with that bit set under
secret A against secret B. With N runs each, |c_A - c_B| >= d has probability at most
P(|Bin(2N, 1/2) - N| >= d) under the null hypothesis (equality at p = 1/2 is the worst case).
A Bonferroni bound over every bit tested keeps the false-positive rate per call at `ALPHA`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from puma_onnx.runtime.comm import PARTIES, ThreadComm, run_parties
from puma_onnx.runtime.party import Party
from puma_onnx.runtime.prg import SEED_BYTES
from puma_onnx.runtime.shares import AShare, BShare

KEY_NAMES = ("k0", "k1", "k2", "all", "own0", "own1", "own2")
RUNS = 32  # per secret: a perfect split of one bit has probability 2^-63 under the null hypothesis
ALPHA = 1e-6  # per view test, over all the bits it tests


def keys_for(observer: int, fixed: dict[str, bytes]) -> dict[str, bytes]:
    """The observer's keys from `fixed`, every other key fresh."""
    held = Party.held_keys(observer)
    return {name: fixed[name] if name in held else os.urandom(SEED_BYTES) for name in KEY_NAMES}


def replicated(secret: np.ndarray, observer: int, own: tuple[np.ndarray, np.ndarray]) -> list[AShare]:
    """Each rank's AShare of `secret` (uint64) where the observer's two components are `own`:
    x_o, x_{o+1} fixed, x_{o+2} = secret - x_o - x_{o+1}."""
    parts = [None] * PARTIES
    parts[observer], parts[(observer + 1) % PARTIES] = own
    parts[(observer + 2) % PARTIES] = secret - own[0] - own[1]
    return [AShare(parts[r], parts[(r + 1) % PARTIES]) for r in range(PARTIES)]


def _words(obj) -> list[np.ndarray]:
    """The arrays an output holds, in a fixed order (shares, lists, dicts, plain arrays)."""
    if obj is None:
        return []
    if isinstance(obj, (AShare, BShare)):
        return [obj.first, obj.second]
    if isinstance(obj, (list, tuple)):
        return [w for o in obj for w in _words(o)]
    if isinstance(obj, dict):
        return [w for k in sorted(obj) for w in _words(obj[k])]
    if hasattr(obj, "materialize"):  # a WeightShare: what the rank can compute from what it keeps
        return _words(obj.materialize())
    return [np.asarray(obj)]


def record(monkeypatch, run) -> list[list[np.ndarray]]:
    """run() with every array each rank receives recorded: [rank] -> list of arrays."""
    seen: list[list[np.ndarray]] = [[] for _ in range(PARTIES)]
    original = ThreadComm._exchange

    def recording(self, sends, recvs):
        got = original(self, sends, recvs)
        seen[self.rank].extend(got[frm] for frm in sorted(got))
        return got

    monkeypatch.setattr(ThreadComm, "_exchange", recording)
    try:
        outputs = run()
    finally:
        monkeypatch.setattr(ThreadComm, "_exchange", original)
    for r in range(PARTIES):
        seen[r].extend(_words(outputs[r]))
    return seen


def _bits(arrays: list[np.ndarray]) -> np.ndarray:
    """The view's bits, with those of derived words: the differences and XORs of every pair of its 64-bit
    words (a byte message of whole words counts as such), in any message (a mask used twice cancels in one
    of them), and XORs of neighbouring bytes."""
    pieces = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    # 64-bit arrays, and byte messages that several arrays were packed into (arith._pack) read as 64-bit words
    # (their whole words: a tail of 4-byte words may leave a few bytes over).
    wide = [np.ascontiguousarray(a).reshape(-1) for a in arrays if a.dtype.itemsize in (1, 8)]
    wide = [a if a.dtype.itemsize == 8 else a[: a.size // 8 * 8].view(np.uint64) for a in wide]
    words = np.concatenate(wide or [[]])
    words = words.astype(np.uint64)
    if words.size > 1:
        i, j = np.triu_indices(words.size, 1)
        pieces += [(words[i] - words[j]).view(np.uint8), (words[i] ^ words[j]).view(np.uint8)]
    for a in arrays:
        if a.dtype.itemsize == 1 and a.size > 1:
            b = np.ascontiguousarray(a).reshape(-1)
            pieces.append(b[1:] ^ b[:-1])
    return np.unpackbits(np.concatenate(pieces)) if pieces else np.zeros(0, np.uint8)


@dataclass
class Verdict:
    leaks: bool
    worst_p: float  # the smallest p-value over the bits tested
    bits: int  # how many bits were tested
    threshold: int  # the |c_A - c_B| that counts as a leak
    split: bool  # some bit is constant under each secret and differs between them: the view determines which


def views(monkeypatch, protocol, secret, observer: int, fixed: dict[str, bytes], runs: int = RUNS) -> np.ndarray:
    """How many of `runs` runs set each bit of the observer's view of protocol(party, secret), over fresh
    foreign keys."""

    def view():
        keys = keys_for(observer, fixed)
        return record(monkeypatch, lambda: run_parties(lambda p: protocol(p, secret), keys=keys))[observer]

    return bit_counts(view, runs)


def leaks(monkeypatch, protocol, secrets: tuple, observer: int, runs: int = RUNS, seed: int = 0) -> Verdict:
    """Whether the observer's view of `protocol(party, secret)` depends on which of the two secrets runs.

    `protocol` gets the party and the secret and must build its inputs so that the observer's own
    shares do not depend on the secret (e.g. with `replicated` and fixed own components).
    """
    rng = np.random.default_rng(seed)
    fixed = {name: rng.bytes(SEED_BYTES) for name in KEY_NAMES}
    ca, cb = (views(monkeypatch, protocol, s, observer, fixed, runs) for s in secrets)
    return compare(ca, cb, runs)


def bit_counts(view, runs: int = RUNS) -> np.ndarray:
    """How many of `runs` calls of view() (a list of arrays) set each bit of it (with derived words, `_bits`)."""
    counts = None
    for _ in range(runs):
        bits = _bits(view()).astype(np.int64)
        if counts is not None and counts.shape != bits.shape:
            raise AssertionError("the view's length varies between runs: the protocol is not deterministic in shape")
        counts = bits if counts is None else counts + bits
    return counts


def compare(ca: np.ndarray, cb: np.ndarray, runs: int = RUNS) -> Verdict:
    """Whether bit counts of the views under two secrets (`views`, `bit_counts`) tell the secrets apart."""
    if ca.shape != cb.shape:
        return Verdict(True, 0.0, ca.size, 0, True)  # even the view's size tells the secrets apart
    d = np.abs(ca - cb)
    # P(|c_A - c_B| >= d) for equal Bernoulli(1/2) samples: c_A + (N - c_B) ~ Bin(2N, 1/2).
    tail = np.minimum(1.0, 2 * binom.sf(runs + d - 1, 2 * runs, 0.5))
    tested = max(1, d.size)  # Bonferroni
    threshold = next(t for t in range(runs + 1) if 2 * binom.sf(runs + t - 1, 2 * runs, 0.5) <= ALPHA / tested)
    split = bool(np.any((d == runs)))
    worst = float(tail.min()) if tail.size else 1.0
    return Verdict(bool(np.any(d >= threshold)), worst, int(d.size), threshold, split)
