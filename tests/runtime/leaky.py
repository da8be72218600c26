"""Deliberately leaky variants of the protocols, for testing the view test (`views.leaks`).

Each mutant stays correct (every rank still agrees on the PRG words it draws, so results are
unchanged) but masks one message with a key its receiver holds, so that rank can unmask a share.
A mutant is a source edit of one runtime function, applied with monkeypatch for one test; the edit's
old text must be found, so a refactor of the protocol breaks the fixture loudly instead of
testing nothing.
"""

from __future__ import annotations

import __future__
import inspect
import textwrap
from dataclasses import dataclass

from puma_onnx.runtime import arith, chain, embedding, onehot, parallel, prepared, weights


@dataclass(frozen=True)
class Mutant:
    module: object
    function: str
    edits: tuple[tuple[str, str], ...]
    why: str

    def apply(self, monkeypatch) -> None:
        source = textwrap.dedent(inspect.getsource(getattr(self.module, self.function)))
        for old, new in self.edits:
            assert source.count(old) == 1, f"{self.function}: the mutant's text {old!r} is not in the protocol"
            source = source.replace(old, new)
        namespace = dict(vars(self.module))
        exec(compile(source, self.module.__file__, "exec", __future__.annotations.compiler_flag), namespace)  # noqa: S102 - test fixture
        monkeypatch.setattr(self.module, self.function, namespace[self.function])


# B's mask r_b of the dealer-aided truncation drawn from the common key (every rank draws it, so all stay in step).
_COMMON_R_B = (
    ("mask = r_a + with_b.words(n)", "mask = r_a + party.prg_all.words(n)"),
    ("c_a = np.ravel(part) + U64(1 << 62) + r_a", "c_a = np.ravel(part) + U64(1 << 62) + r_a\n        party.prg_all.words(n)"),
    ("c_b = np.ravel(part) + party.prg_next.words(n)", "c_b = np.ravel(part) + party.prg_all.words(n)"),
)

MUTANTS = {
    "truncation_mask_from_common_key": Mutant(arith, "_truncate_two", _COMMON_R_B, "B's mask r_b from the common key: "
                                              "A subtracts it from c_b and gets B's part, the secret with its own"),
    # The same edit, shown on a product: the dealer's part folded into the mask does not hide B's part.
    "product_truncation_mask_from_common_key": Mutant(arith, "_truncate_two", _COMMON_R_B, "B's mask r_b from the "
                                                      "common key, on mul_fx: A reads B's part of the product"),
    "reshare_without_zero_sharing": Mutant(
        arith,
        "_reshare",
        (("z = z + party.zero_share(z.shape)", "z = z + 0"),),
        "each rank's product part goes out unmasked",
    ),
    "embedding_mask_from_common_key": Mutant(
        embedding,
        "embedding",
        (
            ("x = party.prg_next.words(packed, np.uint8)", "x = party.prg_all.words(packed, np.uint8)"),
            ("x = party.prg_prev.words(packed, np.uint8)", "x = party.prg_all.words(packed, np.uint8)"),
            (
                "x = got[: packed[0] * packed[1]].reshape(packed)",
                "x = got[: packed[0] * packed[1]].reshape(packed)\n                party.prg_all.words(packed, np.uint8)",
            ),
        ),
        "X from a key the receiver of Y = X xor E holds: it reads the client's one-hot",
    ),
    "embedding_product_mask_from_common_key": Mutant(
        embedding,
        "embedding",
        (
            ("m_a, m_b = key.words((n, hidden)), key.words((n, hidden))",
             "m_a, m_b = party.prg_all.words((n, hidden)), key.words((n, hidden))"),
            ("u = sum(got.values())", "u = sum(got.values())\n            party.prg_all.words((n, hidden))"),
        ),
        "M_A from a key the client holds: it unmasks A's product X @ T_{c+2}, sums of rows of the table",
    ),
    "weight_mask_from_common_key": Mutant(
        weights,
        "weight_seeds",
        (
            ("return party.prg_prev.words(SEED_BYTES, np.uint8).tobytes(), seed_2", "return seed_2, seed_2"),
            ("return party.prg_next.words(SEED_BYTES, np.uint8).tobytes(), seed_2", "return seed_2, seed_2"),
        ),
        "x_0 from the common key: rank 1 regenerates it and unmasks W from x_1",
    ),
    "product_mask_from_common_key": Mutant(
        prepared,
        "mask_seeds",
        (
            ("return None, party.prg_prev", "party.prg_all.words(SEED_BYTES, np.uint8)\n        return None, party.prg_prev"),
            ("return party.prg_next.words(SEED_BYTES, np.uint8).tobytes(), None",
             "return party.prg_all.words(SEED_BYTES, np.uint8).tobytes(), None"),
            ("seed_r = party.prg_prev.words(SEED_BYTES, np.uint8).tobytes()",
             "seed_r = party.prg_all.words(SEED_BYTES, np.uint8).tobytes()"),
        ),
        "R from the common key: the owner subtracts it from x_2 - R and reads the input",
    ),
    "held_input_mask_from_common_key": Mutant(
        prepared,
        "products",
        (
            ("mine = x.part.reshape(n, k) + party.prg_prev.words((n, k)) if held else",
             "mine = x.part.reshape(n, k) + party.prg_all.words((n, k)) if held else"),
            ("comm.exchange({OWNER: x.part.reshape(n, k) - party.prg_next.words((n, k))}, {})",
             "comm.exchange({OWNER: x.part.reshape(n, k) - party.prg_all.words((n, k))}, {})"),
            ("left = got[SENDER] + got[HOLDER]", "left = got[SENDER] + got[HOLDER]\n                party.prg_all.words((n, k))"),
        ),
        "m from the common key: the owner adds it back to rank 1's x_A - m and holds x_A, with its own x_0 + x_1 the input",
    ),
    "chain_mask_from_common_key": Mutant(
        chain,
        "products",
        (
            ("arith.trunc_deal(r_a + with_b.words(n) - z,", "arith.trunc_deal(r_a + party.prg_all.words(n) - z,"),
            ("c_a = z + U64(1 << 62) + r_a", "c_a = z + U64(1 << 62) + r_a\n                party.prg_all.words(n)"),
            ("c_b = z + party.prg_next.words(n)", "c_b = z + party.prg_all.words(n)"),
        ),
        "B's mask in a chained truncation from the common key: A reads B's part of a product on the held answer",
    ),
    "clip_mask_from_common_key": Mutant(
        chain,
        "times_bit",
        (
            ("alpha = words - rho.words(n)", "alpha = words - party.prg_all.words(n)"),
            ("size = np.dtype(wide).itemsize", "size = np.dtype(wide).itemsize\n                party.prg_all.words(n)"),
            ("alpha, beta, gamma = rho.words(n), rho.words(n), rho.words(n, wide)",
             "alpha, beta, gamma = party.prg_all.words(n), rho.words(n), rho.words(n, wide)"),
        ),
        "rho_1 from the common key: rank 1 reads rank 0's half c of the bit, and with its own b_2 the bit",
    ),
    "parallel_keys_from_common_key": Mutant(
        parallel,
        "_child",
        (
            ('seeds = [getattr(party, name).words(SEED_BYTES, np.uint8).tobytes() for name in ("prg_prev", "prg_next", "prg_all", "prg_own")]',
             "seeds = [party.prg_all.words(SEED_BYTES, np.uint8).tobytes()] * 4"),
        ),
        "a branch's keys all from the common key: its zero-sharings vanish and its reshares go out unmasked",
    ),
}


# The outside client's sharing (no protocol among the ranks: tests/runtime/test_onehot.py checks it).
CLIENT_MUTANTS = {
    "onehot_one_seed_twice": Mutant(
        onehot,
        "split",
        (("s = seeds or (new_seed(), new_seed())", "s = seeds or (new_seed(),) * 2"),),
        "X0 and X1 from one seed: X2 = E - 2 X1 shows the one-hot's low bit to ranks 1 and 2",
    ),
}
