"""The batching policy on plain data: slots, FIFO admission under the token budget, deadlines, rounds to
the front, cancellation, the preview throttle."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.batcher import Batcher


@dataclass(eq=False)
class Job:
    id: str
    kv_tokens: int = 10
    deadline: float = 1e12
    started: bool = False


def ids(jobs) -> list[str]:
    return [j.id for j in jobs]


def test_free_slots_count_every_stage():
    b = Batcher(max_jobs=4, token_budget=100, max_previews_per_round=50)
    assert b.free_slots() == 4 and b.idle
    b.hold(Job("a"))
    b.add_judge(Job("j"))
    b.admit(now=0.0)
    b.hold(Job("c"))
    assert (ids(b.active), ids(b.held), ids(b.judges)) == (["a"], ["c"], ["j"])
    assert b.free_slots() == 1 and not b.idle
    b.take_judges()
    assert b.free_slots() == 2


def test_admission_is_fifo_within_the_token_budget():
    b = Batcher(max_jobs=8, token_budget=25, max_previews_per_round=50)
    for name in "abc":
        b.hold(Job(name, kv_tokens=10))
    first = b.admit(now=0.0)
    assert ids(first.admitted) == ["a", "b"] and ids(b.held) == ["c"]  # c would need 30 > 25
    assert b.admit(now=0.0).admitted == []  # nothing left the batch: c still waits
    b.remove(first.admitted[0])
    assert ids(b.admit(now=0.0).admitted) == ["c"]


def test_a_lone_job_over_the_free_budget_waits_but_a_lone_one_always_runs():
    b = Batcher(max_jobs=8, token_budget=25, max_previews_per_round=50)
    b.hold(Job("big", kv_tokens=25))
    b.hold(Job("small", kv_tokens=1))
    assert ids(b.admit(now=0.0).admitted) == ["big"]
    assert ids(b.admit(now=0.0).admitted) == []  # FIFO: small does not overtake when it does not fit
    assert b.fits_alone(Job("x", kv_tokens=25)) and not b.fits_alone(Job("y", kv_tokens=26))


def test_admission_respects_the_slot_count():
    b = Batcher(max_jobs=2, token_budget=10**6, max_previews_per_round=50)
    for name in "abc":
        b.hold(Job(name))
    assert ids(b.admit(now=0.0).admitted) == ["a", "b"] and ids(b.held) == ["c"]


def test_held_jobs_past_their_deadline_expire_unless_they_started():
    b = Batcher(max_jobs=8, token_budget=100, max_previews_per_round=50)
    b.hold(Job("late", deadline=5.0))
    b.hold(Job("reclaimed", deadline=5.0, started=True))
    b.hold(Job("fresh", deadline=50.0))
    out = b.admit(now=10.0)
    assert ids(out.expired) == ["late"] and ids(out.admitted) == ["reclaimed", "fresh"]


def test_next_rounds_go_to_the_front():
    b = Batcher(max_jobs=1, token_budget=100, max_previews_per_round=50)
    b.hold(Job("new"))
    b.hold_next_round(Job("round2"))
    assert ids(b.admit(now=0.0).admitted) == ["round2"]


def test_retire_removes_running_and_held_jobs_only():
    b = Batcher(max_jobs=1, token_budget=100, max_previews_per_round=50)
    b.hold(Job("run"))
    b.admit(now=0.0)
    b.hold(Job("wait"))
    b.add_judge(Job("judge"))
    gone = b.retire({"run", "wait", "judge", "unknown"})
    assert sorted(ids(gone)) == ["run", "wait"] and ids(b.jobs) == ["judge"]
    assert ids(b.clear()) == ["judge"] and b.idle


@pytest.mark.parametrize(
    "every, total, cap, due",
    [
        (0, 10, 50, []),  # no previews asked
        (1, 10, 50, list(range(1, 10))),  # never after the last step: the result follows
        (3, 10, 50, [3, 6, 9]),
        (1, 10, 3, [4, 8]),  # 10 steps, at most 3 previews: every 1 is raised to every 4
        (5, 200, 50, list(range(5, 200, 5))),
    ],
)
def test_preview_throttle(every, total, cap, due):
    b = Batcher(max_jobs=1, token_budget=1, max_previews_per_round=cap)
    assert [s for s in range(1, total + 1) if b.preview_due(s, total, every)] == due
