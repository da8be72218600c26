"""A computing rank: its communicator, fixed-point format and correlated randomness.

Keys (Araki et al. 2016, section 2.2): k_j is known to ranks j-1 and j, so rank i
holds k_i (`prg_prev`, shared with i-1) and k_{i+1} (`prg_next`, shared with i+1).
`prg_all` is known to all three ranks, `prg_own` to this rank only. Each rank draws
its seed with os.urandom and sends it once, at setup.

Zero-sharing: alpha_i = F(k_i) - F(k_{i+1}) sums to 0 over the ranks; each call
draws fresh words, so every reshare is re-randomised (CrypTen's replicated mode
reused a mask and leaked, CrypTen issue 518).
"""

from __future__ import annotations

import numpy as np

from .comm import PARTIES, Communicator
from .prg import PRG, SEED_BYTES, new_seed
from .ring import FixedPoint

# Comparisons reduce shares mod 2^MSB_BITS before the bit circuit: exact while
# |x| < 2^(MSB_BITS-1), i.e. |x| < 2^29 in real terms with 18 fractional bits.
DEFAULT_MSB_BITS = 48


class Party:
    def __init__(
        self,
        comm: Communicator,
        fxp: FixedPoint,
        prg_prev: PRG,
        prg_next: PRG,
        prg_all: PRG,
        prg_own: PRG,
        msb_bits: int = DEFAULT_MSB_BITS,
    ):
        if not 2 <= msb_bits <= 64:
            raise ValueError(f"msb_bits must be in [2, 64], got {msb_bits}")
        self.comm = comm
        self.rank = comm.rank
        self.fxp = fxp
        self.prg_prev = prg_prev
        self.prg_next = prg_next
        self.prg_all = prg_all
        self.prg_own = prg_own
        self.msb_bits = msb_bits
        self._dealer = 0

    @classmethod
    def setup(cls, comm: Communicator, frac_bits: int = 18, msb_bits: int = DEFAULT_MSB_BITS) -> Party:
        """One round: rank i sends its pairwise seed to i-1 and a contribution to the common key to both."""
        i = comm.rank
        prev, nxt = (i - 1) % PARTIES, (i + 1) % PARTIES
        pair_seed, common = new_seed(), new_seed()
        as_array = lambda b: np.frombuffer(b, dtype=np.uint8)  # noqa: E731
        with comm.tag("setup"):
            got = comm.exchange(
                {prev: as_array(pair_seed + common), nxt: as_array(common)},
                {nxt: ((2 * SEED_BYTES,), np.uint8), prev: ((SEED_BYTES,), np.uint8)},
            )
        keys = {
            f"k{i}": pair_seed,
            f"k{nxt}": got[nxt][:SEED_BYTES].tobytes(),
            # The common key is the XOR of all three contributions.
            "all": (as_array(common) ^ got[nxt][SEED_BYTES:] ^ got[prev]).tobytes(),
            f"own{i}": new_seed(),
        }
        return cls.from_keys(comm, keys, frac_bits, msb_bits)

    @classmethod
    def from_keys(
        cls, comm: Communicator, keys: dict[str, bytes], frac_bits: int = 18, msb_bits: int = DEFAULT_MSB_BITS
    ) -> Party:
        """A party from named keys: k0, k1, k2 (pairwise), all, own0..own2; rank i uses k_i, k_{i+1},
        all and own_i. `setup` agrees on them; the security tests choose them (`held_keys`)."""
        i = comm.rank
        return cls(
            comm,
            FixedPoint(frac_bits),
            prg_prev=PRG(keys[f"k{i}"]),
            prg_next=PRG(keys[f"k{(i + 1) % PARTIES}"]),
            prg_all=PRG(keys["all"]),
            prg_own=PRG(keys[f"own{i}"]),
            msb_bits=msb_bits,
        )

    @property
    def next(self) -> int:
        return (self.rank + 1) % PARTIES

    @property
    def prev(self) -> int:
        return (self.rank - 1) % PARTIES

    @staticmethod
    def held_keys(rank: int) -> set[str]:
        """The names of the keys rank `rank` holds (`from_keys`)."""
        return {f"k{rank}", f"k{(rank + 1) % PARTIES}", "all", f"own{rank}"}

    def zero_share(self, shape) -> np.ndarray:
        """alpha_i with alpha_0 + alpha_1 + alpha_2 = 0 mod 2^64, fresh on every call."""
        return self.prg_prev.words(shape) - self.prg_next.words(shape)

    def zero_share_xor(self, shape) -> np.ndarray:
        """Bytes with XOR over the ranks = 0, fresh on every call (masks boolean reshares)."""
        return self.prg_prev.words(shape, np.uint8) ^ self.prg_next.words(shape, np.uint8)

    def next_dealer(self) -> int:
        """Rotates the dealer of dealer-based protocols so that each rank deals a third of the time.

        All ranks call protocols in the same order, so they agree on the dealer.
        """
        d = self._dealer
        self._dealer = (d + 1) % PARTIES
        return d
