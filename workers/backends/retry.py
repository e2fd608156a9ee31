"""When a remote call is tried again: which failures, after how long, and never past the call's deadline.

Exponential backoff with full jitter (each wait drawn from zero to the capped exponential), the standard that
keeps many clients of one overloaded server from retrying in step; a server's ``Retry-After`` (seconds or an
HTTP date) is honoured as the least wait. A call is never retried once its first token has gone to the client.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def retry_after_s(header: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now; None when absent or unreadable."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    """Tries in all, the first included."""
    base_s: float
    cap_s: float

    def wait_s(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """The wait before try ``attempt + 1`` (``attempt`` counts from 1)."""
        jittered = rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))
        return max(jittered, retry_after or 0.0)

    def next_wait(self, attempt: int, retry_after: float | None, deadline: float, rng: random.Random) -> float | None:
        """The wait before the next try, or None: no tries left, or it would end past the deadline."""
        if attempt >= self.attempts:
            return None
        wait = self.wait_s(attempt, retry_after, rng)
        return wait if time.monotonic() + wait < deadline else None
