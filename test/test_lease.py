"""The life of a leased job as one state (reflworkerd.lease): the moves it
may make and those it refuses, and the one reason it is asked to end, where
a stronger reason replaces a weaker one and never the other way. The five
ways a job ends on a worker are driven end to end in test_poller.py."""

import pytest
from twisted.internet.task import Clock

from reflworkerd.lease import MOVES, Ending, LeasedJob, State
from reflworkerd.serverclient import Backoff, Reachability


class Poller:
    """What a LeasedJob takes from its poller, and nothing more."""

    def __init__(self, jobsDir):
        self.reactor = Clock()
        self.client = None
        self.jobsDir = str(jobsDir)
        self.reachability = Reachability("http://127.0.0.1:1/")
        self.progressInterval = 1.0
        self.checkpointEvery = 60.0
        self.resultBytesQuota = 1 << 20
        self.resultFilesQuota = 10
        self.partSize = 1 << 16
        self.inThread = None

    def slotUid(self, slot):
        return None

    def makeBackoff(self, cap=None):
        return Backoff(0.5, cap or 30.0, random=lambda: 0.5)


@pytest.fixture
def job(tmp_path):
    return LeasedJob(Poller(tmp_path), 7, 1, 30.0)


ALLOWED = [(a, b) for a in State for b in MOVES[a]]
REFUSED = [(a, b) for a in State for b in State if b not in MOVES[a]]


@pytest.mark.parametrize("start, end", ALLOWED, ids=lambda s: s.value)
def test_an_allowed_move_is_made(job, start, end):
    job.state = start
    job._moveTo(end)
    assert job.state is end


@pytest.mark.parametrize("start, end", REFUSED, ids=lambda s: s.value)
def test_an_impossible_move_is_refused_and_changes_nothing(job, start, end):
    job.state = start
    with pytest.raises(RuntimeError, match="cannot go from %s to %s" % (start.value, end.value)):
        job._moveTo(end)
    assert job.state is start


def test_done_is_the_end_and_every_state_can_reach_it():
    assert MOVES[State.DONE] == set()
    for state in State:
        seen, todo = set(), [state]
        while todo:
            here = todo.pop()
            seen.add(here)
            todo.extend(MOVES[here] - seen)
        assert State.DONE in seen, state


def test_a_new_job_is_leased_with_no_ending(job):
    assert (job.state, job.ending) == (State.LEASED, None)
    assert not (job.cancelled or job.releasing or job.dropped)


@pytest.mark.parametrize("first, then, stands", [
    (Ending.CANCEL, Ending.RELEASE, Ending.RELEASE),
    (Ending.CANCEL, Ending.DROP, Ending.DROP),
    (Ending.RELEASE, Ending.DROP, Ending.DROP),
    (Ending.RELEASE, Ending.CANCEL, Ending.RELEASE),
    (Ending.DROP, Ending.CANCEL, Ending.DROP),
    (Ending.DROP, Ending.RELEASE, Ending.DROP),
])
def test_a_stronger_ending_replaces_a_weaker_one_never_the_reverse(job, first, then, stands):
    job._endAs(first)
    job._endAs(then)
    assert job.ending is stands
    assert (job.cancelled, job.releasing, job.dropped) == (
        stands is Ending.CANCEL, stands is Ending.RELEASE, stands is Ending.DROP)


def test_a_drop_stops_the_heartbeats_and_a_second_drop_changes_nothing(job):
    job.heartbeats.schedule()
    assert job.reactor.getDelayedCalls()
    job.drop("409 from the server")
    assert job.dropped and job.reactor.getDelayedCalls() == []
    job.drop("again")
    assert job.ending is Ending.DROP


def test_halt_moves_a_job_in_hand_to_halted_and_leaves_a_delivered_one(job):
    job.state = State.DELIVERING
    job.halt()
    assert job.state is State.HALTED
    job.state = State.DELIVERED
    job.halt()
    assert job.state is State.DELIVERED
