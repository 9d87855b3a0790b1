"""Who takes part in an outer round of a stage's replicas: the policy, as pure code over votes.

Every replica must apply the same shares in the same order, or the anchors drift apart for good. So
one replica decides each round's members and the others follow:

- The **leader** is the lowest peer id among the live certified replicas of the stage (the DHT's
  signed records) and itself. A replica that is called as leader by a higher id while it knows a
  lower one answers `not_leader`, and the caller asks again with a fresh view.
- Each replica, once it has started round r, pushes its share to the others and **votes** to the
  leader, again and again until decided: round r, the peers whose checked share it holds.
- The leader decides as soon as every live replica voted and each holds every voter's share, or
  `round_timeout` seconds after the round's first vote, with what it has: the largest set in which
  every member holds every member's share (`members`). A decision never changes.
- Every replica applies round r, members' shares in sorted peer-id order, so every anchor takes the
  same outer step. A replica left out (late, its share lost) observes the round: the same anchor
  step, its own progress kept in its weights for its next share. One that lacks a member's share,
  or asks about a round the leader forgot, copies a member's state (anchor, round) instead. A
  replica that dies mid-round never votes, and the round goes on without it at the deadline.
- Rounds stay aligned: a replica that receives a share of the round it is at starts that round
  too, whatever its own step count, so a replica with less traffic is never rounds behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pmnode.config import RunConfig
from pmnode.net.outer_rpcs import Decision, Vote

KEEP = 32  # rounds whose decisions the leader remembers (a late replica asks about an old one)


def leader_of(me: str, live: list[str]) -> str:
    return min([me, *live])


def sample_cap(cfg: RunConfig) -> int:
    """The most samples one share may claim: inner_steps steps of at most two batches each (a step
    takes the samples ready when a batch completes, so fewer than batch_size + one batch); an honest
    replica that carried progress over aborted rounds reports this many at most."""
    return 2 * cfg.replica_sync.inner_steps * cfg.train.batch_size


def members(votes: dict[str, Vote]) -> list[str]:
    """The largest set of voters in which each holds every member's share: the voter with the most
    gaps (shares it lacks, and members lacking its share) goes first, the highest id on a tie."""
    m = set(votes)
    while m:
        gaps = {p: sum(q not in votes[p].have for q in m) + sum(p not in votes[q].have for q in m) for p in m}
        worst = max(m, key=lambda p: (gaps[p], p))
        if gaps[worst] == 0:
            break
        m.remove(worst)
    return sorted(m)


@dataclass
class Book:
    """The leader's page for one round."""

    opened: float  # when its first vote came (monotonic seconds)
    votes: dict[str, Vote] = field(default_factory=dict)
    decision: Decision | None = None


class Ledger:
    """The leader's side of every round it is asked about; `vote` is the whole protocol."""

    def __init__(self, me: str, timeout: float):
        self.me, self.timeout = me, timeout
        self.books: dict[int, Book] = {}
        self.next_round = 0  # one past the last round decided here

    def vote(self, voter: str, vote: Vote, live: list[str], now: float) -> Decision:
        """Record `voter`'s vote (its peer id from the connection); the round's decision, or pending."""
        r = vote.round
        book = self.books.get(r)
        if book is None:
            if self.books and r < min(self.books):  # long decided and forgotten: the voter must copy
                return Decision(round=r, status="gone", next_round=self.next_round)
            book = self.books[r] = Book(opened=now)
        if book.decision is None:
            book.votes[voter] = vote
            self._maybe_decide(r, book, live, now)
        if book.decision is not None:
            return book.decision.model_copy(update={"next_round": max(self.next_round, r + 1)})
        return Decision(round=r, status="pending", next_round=self.next_round)

    def _maybe_decide(self, r: int, book: Book, live: list[str], now: float) -> None:
        voters = set(book.votes)
        chosen = members(book.votes)
        everyone = voters >= {self.me, *live} and len(chosen) == len(voters)
        if not everyone and now - book.opened < self.timeout:
            return
        final = bool(chosen) and all(book.votes[p].final for p in chosen)
        book.decision = Decision(round=r, status="decided", members=chosen, final=final)
        self.next_round = max(self.next_round, r + 1)
        for old in sorted(self.books)[:-KEEP]:
            del self.books[old]

    def tick(self, live: list[str], now: float) -> None:
        """Decide the rounds whose deadline passed, even if nobody votes again (the leader's loop)."""
        for r, book in list(self.books.items()):
            if book.decision is None:
                self._maybe_decide(r, book, live, now)
