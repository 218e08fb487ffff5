"""The batching policy of one worker, from plain data: how many jobs to take, which held jobs to admit,
which to expire, where next rounds go, which jobs leave on cancel, and when a preview is due.

It never touches the queue, the engine or metrics (`tests/test_import_boundaries.py` pins that), so the
policy is unit-tested on its own and `server.worker.Worker` is the I/O loop around it:

- **Slots.** A worker runs at most `max_jobs` jobs (held, active and judge jobs together) and takes from
  the queue only what fits in the free slots.
- **Admission.** Held jobs are admitted first in, first out while the running batch has slots and the
  KV + query token budget allows; a lone job always fits (the budget was checked at intake). A held job
  whose deadline passed before it ever started is expired instead of admitted.
- **Rounds.** The next round of a multi-round job is held at the front, so it runs before newer jobs.
- **Previews.** A job asks for one every `preview_every` steps; the rate is raised so that no round
  publishes more than `max_previews_per_round` (previews are the bulk of an event stream's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Batchable(Protocol):
    """What the policy reads of a job."""

    @property
    def id(self) -> str: ...

    @property
    def kv_tokens(self) -> int: ...  # KV slots + query rows it holds while it runs

    @property
    def deadline(self) -> float: ...  # wall-clock time by which it must have started

    @property
    def started(self) -> bool: ...  # it ran before (an earlier round, or an earlier delivery)


J = TypeVar("J", bound=Batchable)


@dataclass
class Admission(Generic[J]):
    """What one admission pass decided: jobs to prefill now, and held jobs whose deadline passed."""

    admitted: list[J] = field(default_factory=list)
    expired: list[J] = field(default_factory=list)


class Batcher(Generic[J]):
    def __init__(self, max_jobs: int, token_budget: int, max_previews_per_round: int) -> None:
        self.max_jobs = max_jobs
        self.token_budget = token_budget
        self.max_previews_per_round = max_previews_per_round
        self.held: list[J] = []  # taken, waiting for budget; front first
        self.active: list[J] = []  # prefilled, in the running batch
        self.judges: list[J] = []  # judge jobs: one forward for all of them at the next tick

    # ---- slots ----
    @property
    def jobs(self) -> list[J]:
        """Every job this worker holds, in any stage."""
        return [*self.active, *self.held, *self.judges]

    @property
    def idle(self) -> bool:
        return not (self.active or self.held or self.judges)

    def free_slots(self) -> int:
        """How many jobs the worker may take from the queue now."""
        return max(0, self.max_jobs - len(self.active) - len(self.held) - len(self.judges))

    def fits_alone(self, job: J) -> bool:
        """Whether a job can ever run here: its tokens fit the budget of an otherwise empty batch."""
        return job.kv_tokens <= self.token_budget

    # ---- placement ----
    def hold(self, job: J) -> None:
        self.held.append(job)

    def hold_next_round(self, job: J) -> None:
        """A finished round's job comes back for its next round ahead of everything held."""
        self.held.insert(0, job)

    def add_judge(self, job: J) -> None:
        self.judges.append(job)

    def take_judges(self) -> list[J]:
        batch, self.judges = self.judges, []
        return batch

    def admit(self, now: float) -> Admission[J]:
        """Move held jobs into the running batch (FIFO) while slots and the token budget allow."""
        out: Admission[J] = Admission()
        used = sum(j.kv_tokens for j in self.active)
        while self.held and len(self.active) < self.max_jobs:
            job = self.held[0]
            if self.active and used + job.kv_tokens > self.token_budget:
                break
            self.held.pop(0)
            if now > job.deadline and not job.started:
                out.expired.append(job)
                continue
            self.active.append(job)
            out.admitted.append(job)
            used += job.kv_tokens
        return out

    def remove(self, job: J) -> None:
        """Take a job out of the batch, wherever it is (finished, failed, cancelled)."""
        self.active = [j for j in self.active if j is not job]
        self.held = [j for j in self.held if j is not job]
        self.judges = [j for j in self.judges if j is not job]

    def retire(self, ids: set[str]) -> list[J]:
        """Remove the running and held jobs in `ids` (cancelled); returns them."""
        gone = [j for j in [*self.active, *self.held] if j.id in ids]
        for job in gone:
            self.remove(job)
        return gone

    def clear(self) -> list[J]:
        """Remove every job (drain, fatal error); returns them."""
        everything = self.jobs
        self.active, self.held, self.judges = [], [], []
        return everything

    # ---- previews ----
    def preview_due(self, step: int, total: int, preview_every: int) -> bool:
        """Whether a job that asked for a preview every `preview_every` steps gets one after `step`
        (never after the last step: the result follows at once)."""
        if not preview_every or step >= total:
            return False
        every = max(preview_every, -(-total // self.max_previews_per_round))
        return step % every == 0
