"""The network model's arithmetic, the BANDWIDTH,RTT syntax, and the simulated link's delays."""

from __future__ import annotations

import time

import numpy as np
import pytest

from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.network import LAN, WAN, Link, estimates, parse_link, predict


def test_the_prediction_takes_the_slowest_rank_in_each_round():
    # Two rounds. Round 1: rank 2 computes longest; round 2: rank 0 sends the most.
    traces = [
        [[0.010, 1_000], [0.001, 1_000_000]],
        [[0.020, 1_000], [0.001, 0]],
        [[0.030, 0], [0.002, 1_000]],
    ]
    tails = [0.005, 0.004, 0.001]
    link = Link(1e8, 0.01)  # 100 Mbit/s, 10 ms
    # Round 1: max(0.010 + 8e-5, 0.020 + 8e-5, 0.030) = 0.030; round 2: max(0.001 + 0.08, 0.001, 0.002 + 8e-5) = 0.081.
    want = 0.030 + 0.081 + 2 * 0.01 + 0.005
    assert predict(traces, tails, link) == pytest.approx(want, rel=1e-12)


def test_estimates_name_the_lan_the_wan_and_each_extra_link():
    traces = [[[0.0, 125_000_000]]] * 3  # one round of 1 Gbit from every rank
    got = estimates(traces, [0.0] * 3, (parse_link("10Gbit,0.5ms"),))
    assert got == {
        "LAN 5 Gbit/s, 1 ms": pytest.approx(1 / 5 + LAN[2], abs=1e-3),
        "WAN 100 Mbit/s, 40 ms": pytest.approx(1e9 / WAN[1] + WAN[2], abs=1e-3),
        "10 Gbit/s, 0.5 ms": pytest.approx(0.1 + 0.0005, abs=1e-3),
    }


def test_ranks_that_disagree_on_the_round_count_are_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        predict([[[0, 0]], [], [[0, 0]]], [0, 0, 0], Link(1e9, 1e-3))


@pytest.mark.parametrize(
    "text, bits, rtt",
    [
        ("1Gbit,2ms", 1e9, 2e-3), ("100Mbps,40ms", 1e8, 0.04), ("5G,1ms", 5e9, 1e-3), ("250kbit/s, 0.5s", 2.5e5, 0.5),
        ("1GB/s,1ms", 8e9, 1e-3), ("1Tbit,10us", 1e12, 1e-5),
    ],
)
def test_links_read_with_their_units(text, bits, rtt):
    link = parse_link(text)
    assert (link.bits_per_s, link.rtt_s) == pytest.approx((bits, rtt), rel=1e-12)


@pytest.mark.parametrize("text", ["5,1ms", "1/s,1ms", "1Gbit,2", "1Gbit", "0Gbit,1ms", "fast,1ms", "1Gbit,2ms,3"])
def test_a_link_without_units_or_parts_is_refused(text):
    with pytest.raises(ValueError):
        parse_link(text)


def test_the_simulated_link_adds_at_least_its_delays_to_every_round():
    """A lower bound, which load on the machine cannot break: 4 rounds of 125,000 bytes from every rank
    at 20 Mbit/s (50 ms each) with a 30 ms RTT take at least 4 x 80 ms."""
    link, rounds, payload = parse_link("20Mbit,30ms"), 4, np.zeros(125_000, np.uint8)

    def program(party):
        party.comm.simulate = link
        start = time.perf_counter()
        for _ in range(rounds):
            party.comm.exchange({party.next: payload}, {party.prev: (payload.shape, np.uint8)})
        return time.perf_counter() - start, len(party.comm.trace)

    for took, traced in run_parties(program):
        assert took >= rounds * (8 * payload.size / link.bits_per_s + link.rtt_s)
        assert traced >= rounds
