"""The retry policy: which failures are retried, how long to wait, and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Retries connection errors and the statuses in `retry_statuses` (429, 502, 503), waiting what the
    server's `Retry-After` says or, without it, an exponential backoff with full jitter. A request is
    tried at most `max_attempts` times and no retry starts once `max_elapsed_s` would pass. Submits
    carry one Idempotency-Key for all their tries, so a retry never creates a second job.

    For event streams the same bounds apply per outage: consecutive reconnects without a new event.
    """

    max_attempts: int = 6
    max_elapsed_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 502, 503}))

    def delay(self, attempt: int, elapsed_s: float, retry_after: float | None = None) -> float | None:
        """Seconds to wait before try `attempt + 1`, after `attempt` tries that took `elapsed_s`;
        None: give up."""
        if attempt >= self.max_attempts:
            return None
        if retry_after is not None:
            wait = retry_after + random.uniform(0, min(1.0, 0.1 * retry_after))  # spread a herd
        else:
            wait = random.uniform(0, min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1)))
        if elapsed_s + wait > self.max_elapsed_s:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)
