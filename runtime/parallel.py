"""Independent protocols side by side: their rounds travel together.

`parallel(party, *branches)` runs each branch (a function of a Party) as a greenlet (a coroutine with a
stack of its own: no thread, no lock) on a child Party: keys of its own, drawn from the parent's PRGs
(every rank draws them alike, so each pair of ranks still agrees), and a communicator that, instead of
exchanging, hands its round to the caller and waits. Once every branch still running has posted its
round, the caller sends each peer one message (the branches' words in branch order), splits what arrives
by the sizes each branch expects and resumes each branch with its part: round i of the merged run is
round i of every branch still running. Rounds: the longest branch's; bytes: the sum of the branches'.
The ranks stay in step because a protocol's rounds do not depend on the data: each branch posts its
i-th round on every rank, and the branches running at round i are the same on every rank.

Branches share no mutable state: each reads its inputs and returns its outputs. Only the caller calls the
parent's communicator. An error in a branch ends the run at once and is raised here. A merged round is
counted under the caller's tag (the branches' own tags, msb or select, are not kept apart).
Security: each branch sends and receives what it would alone; the concatenation adds nothing.
"""

from __future__ import annotations

import math

import numpy as np
from greenlet import greenlet

from .comm import PARTIES, Communicator
from .party import Party
from .prg import PRG, SEED_BYTES


class _BranchComm(Communicator):
    """A branch's communicator: each round goes to the caller, which resumes the branch with what arrived."""

    def __init__(self, parent: Communicator, index: int, posts: dict):
        super().__init__(parent.rank)
        self._tags = list(parent._tags)
        self.index, self.posts = index, posts
        self.caller: greenlet | None = None

    def _exchange(self, sends, recvs):
        self.posts[self.index] = (sends, recvs)
        return self.caller.switch()


def _merged_round(comm: Communicator, posts: dict[int, tuple[dict, dict]]) -> dict[int, dict]:
    """One exchange of `comm` for the posted rounds (branch -> (sends, receive specs)); what each branch got."""
    order = sorted(posts)
    sends, recvs, pieces = {}, {}, {}
    for peer in range(PARTIES):
        if peer == comm.rank:
            continue
        out = [posts[i][0][peer].reshape(-1).view(np.uint8) for i in order if peer in posts[i][0]]
        if out:
            sends[peer] = np.concatenate(out) if len(out) > 1 else out[0]
        specs = [(i, *posts[i][1][peer]) for i in order if peer in posts[i][1]]
        total = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in specs)
        if total:
            recvs[peer], pieces[peer] = ((total,), np.uint8), specs
    got = comm.exchange(sends, recvs)
    results: dict[int, dict] = {i: {} for i in order}
    for peer, specs in pieces.items():
        at = 0
        for i, shape, dtype in specs:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            results[i][peer] = got[peer][at : at + size].view(dtype).reshape(shape)
            at += size
    return results


def _child(party: Party, comm: Communicator) -> Party:
    """A party with keys of its own, drawn from the parent's (rank i's prg_prev and rank i-1's prg_next are
    one stream, so the pairs agree)."""
    seeds = [getattr(party, name).words(SEED_BYTES, np.uint8).tobytes() for name in ("prg_prev", "prg_next", "prg_all", "prg_own")]
    child = Party(comm, party.fxp, *(PRG(s) for s in seeds), msb_bits=party.msb_bits)
    child._dealer = party._dealer
    return child


def parallel(party: Party, *branches):
    """[branch(child party) for each branch], their rounds merged (see the module doc)."""
    posts: dict[int, tuple[dict, dict]] = {}
    comms = [_BranchComm(party.comm, i, posts) for i in range(len(branches))]
    children = [_child(party, c) for c in comms]
    outputs: list = [None] * len(branches)
    done = [False] * len(branches)

    def body(i: int):
        def run():
            outputs[i] = branches[i](children[i])
            done[i] = True

        return run

    lets = [greenlet(body(i)) for i in range(len(branches))]
    for c in comms:
        c.caller = greenlet.getcurrent()
    got: dict[int, dict] = {}
    while True:
        for i, let in enumerate(lets):
            if not done[i]:  # on to its next round, or to its end
                if i in got:
                    let.switch(got[i])
                else:
                    let.switch()
        running = [i for i in range(len(branches)) if not done[i]]
        if not running:
            return outputs
        got = _merged_round(party.comm, {i: posts.pop(i) for i in running})
