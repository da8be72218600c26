import numpy as np
import pytest

from puma_onnx.runtime.comm import Cost, ThreadComm, run_parties


def ring_pass(party):
    comm = party.comm
    with comm.tag("outer"):
        with comm.tag("inner"):
            got = comm.exchange(
                {party.next: np.full(4, comm.rank, dtype=np.uint64)}, {party.prev: ((4,), np.uint64)}
            )
        comm.exchange({}, {})
    return got[party.prev], comm.stats


def test_exchange_delivers_to_the_named_rank():
    results = run_parties(ring_pass)
    for rank, (got, _) in enumerate(results):
        assert np.array_equal(got, np.full(4, (rank - 1) % 3))


def test_counters_record_bytes_rounds_and_tag_path():
    _, stats = run_parties(ring_pass)[0]
    paths = stats.by_path()
    assert paths["outer/inner"] == Cost(bytes=32, rounds=1, messages=1)
    # An idle round still counts: latency is the same on every rank.
    assert paths["outer"] == Cost(bytes=0, rounds=1, messages=0)
    assert stats.by_protocol()["inner"] == Cost(32, 1, 1)


def test_snapshot_diff_measures_one_operation():
    def prog(party):
        before = party.comm.stats.snapshot()
        party.comm.exchange({party.next: np.zeros(10, np.uint32)}, {party.prev: ((10,), np.uint32)})
        return party.comm.stats.snapshot() - before

    assert run_parties(prog)[0] == Cost(bytes=40, rounds=1, messages=1)


def test_empty_messages_are_not_sent():
    def prog(party):
        got = party.comm.exchange({party.next: np.zeros((0, 3))}, {party.prev: ((0, 3), np.float64)})
        return got[party.prev].shape, party.comm.stats.by_path()["untagged"]

    shape, cost = run_parties(prog)[0]
    assert shape == (0, 3) and cost == Cost(0, 1, 0)


def test_run_parties_reraises_the_first_failure():
    def prog(party):
        if party.rank == 1:
            raise KeyError("boom")
        party.comm.exchange({}, {1: ((1,), np.uint64)})

    with pytest.raises(KeyError, match="boom"):
        run_parties(prog)


def test_shape_mismatch_is_reported():
    comms = ThreadComm.group()
    comms[1]._boxes[(1, 0)].put(np.zeros(3, np.uint64))
    with pytest.raises(RuntimeError, match="disagree"):
        comms[0].exchange({}, {1: ((4,), np.uint64)})


def test_untraced_rounds_stay_out_of_the_trace_and_compute_around_them_stays_in():
    import time

    def prog(party):
        comm = party.comm
        before = comm.stats.snapshot()
        comm.begin_trace()
        comm.exchange({party.next: np.zeros(2, np.uint64)}, {party.prev: ((2,), np.uint64)})
        time.sleep(0.05)  # computed before the weights arrive: counts for the next traced round
        with comm.untraced():
            for _ in range(3):
                comm.exchange({party.next: np.zeros(1000, np.uint64)}, {party.prev: ((1000,), np.uint64)})
            time.sleep(0.2)  # sharing work: not online compute
        comm.exchange({party.next: np.zeros(4, np.uint64)}, {party.prev: ((4,), np.uint64)})
        return comm.trace, comm.stats.snapshot() - before

    trace, total = run_parties(prog)[0]
    assert [b for _, b in trace] == [16, 32] and total.rounds == 5  # counted, but not traced
    assert 0.05 <= trace[1][0] < 0.2
