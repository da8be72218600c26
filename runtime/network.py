"""The online time on a real network, predicted from a run on this machine; and a simulated link.

Every rank records, round by round, the seconds it computed before the round and the bytes it sent in
it (`Communicator.trace`). With three hosts, each host's network card carries both of its rank's
links, so a round ends when the slowest rank has computed and pushed its bytes, and the message has
crossed the network:

    time = sum over rounds k of max over ranks r (compute[r][k] + 8 bytes[r][k] / bandwidth)
           + rounds * rtt + the slowest rank's computing after its last round.

A round is charged a whole round trip, as the PUMA and SPU papers do. The ranks of a round send at
the same time and each waits for one message, so a one-way delay would often do: the estimate errs
on the slow side. Compute is what this machine measured. Here three ranks share two cores, so a
rank's compute slice includes waiting for a core: for three hosts it is an upper bound too.

`simulate` makes a communicator behave like such a link: before each round's sends, a rank sleeps
8 bytes / bandwidth (its card pushing the bytes), and after receiving it sleeps one rtt (the
crossing). The prediction and the simulated run can then be compared (benchmarks/network.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# PUMA's LAN (Dong et al. 2023, section 5) and a WAN setting common in the secure-inference literature.
LAN = ("LAN", 5e9, 1e-3)
WAN = ("WAN", 100e6, 40e-3)

_RATE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_LINK = re.compile(
    r"\s*(?P<rate>[0-9]*\.?[0-9]+)\s*(?P<prefix>[kKmMgGtT]?)(?P<unit>bit|bps|b|B|Bps|byte)?(?P<per>/s)?\s*,"
    r"\s*(?P<rtt>[0-9]*\.?[0-9]+)\s*(?P<time>s|ms|us)\s*"
)


@dataclass(frozen=True)
class Link:
    bits_per_s: float
    rtt_s: float
    name: str = ""

    def label(self) -> str:
        speed = next(
            f"{self.bits_per_s / scale:g} {unit}bit/s" for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
            if self.bits_per_s >= scale or scale == 1
        )
        return f"{self.name + ' ' if self.name else ''}{speed}, {self.rtt_s * 1e3:g} ms"


def parse_link(text: str) -> Link:
    """'BANDWIDTH,RTT', e.g. '1Gbit,2ms', '100Mbps,40ms', '5G,1ms' (bits), '1GB/s,1ms' (a capital B: bytes);
    ValueError with the accepted forms."""
    match = _LINK.fullmatch(text)
    if not match or not (match["prefix"] or match["unit"]) or (match["per"] and not match["unit"]):
        raise ValueError(f"{text!r} is not BANDWIDTH,RTT with units (e.g. 1Gbit,2ms, 100Mbps,40ms or 1GB/s,1ms)")
    per_unit = 8.0 if match["unit"] in ("B", "Bps", "byte") else 1.0  # bytes: a capital B
    rate = float(match["rate"]) * _RATE[match["prefix"].lower()] * per_unit
    link = Link(rate, float(match["rtt"]) * _TIME[match["time"]])
    if link.bits_per_s <= 0:
        raise ValueError(f"{text!r}: the bandwidth must be positive")
    return link


def predict(traces: list[list[list[float]]], tails: list[float], link: Link) -> float:
    """Seconds online over `link`: traces[r] = [[compute_s, bytes], ...] per round of rank r (every rank
    takes part in every round), tails[r] = its compute after its last round."""
    rounds = {len(t) for t in traces}
    if len(rounds) != 1:
        raise ValueError(f"the ranks' traces differ in length: {sorted(rounds)} rounds")
    total = max(tails, default=0.0)
    for per_rank in zip(*traces):
        total += max(compute + 8.0 * nbytes / link.bits_per_s for compute, nbytes in per_rank) + link.rtt_s
    return total


def estimates(traces, tails, extra: tuple[Link, ...] = ()) -> dict[str, float]:
    """The prediction at the LAN, the WAN and each extra link, by label, in seconds (3 decimals)."""
    links = [Link(bw, rtt, name) for name, bw, rtt in (LAN, WAN)] + list(extra)
    return {link.label(): round(predict(traces, tails, link), 3) for link in links}
