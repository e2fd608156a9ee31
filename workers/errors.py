"""The root of every error a user can act on.

Bad input, a missing file, an unknown name, a cluster that cannot be reached:
each layer raises its own subclass, and the edges catch this one type. The CLI
prints one line and exits 2; the API answers with a 4xx. An error that is not
a ``UserError`` is a bug or a failed piece of work, and is reported as such.

It lives in the lowest layer that has errors of its own, so that routers,
workers and the orchestrator can all derive from it without importing upwards.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and, where it can, what to do."""
