"""The one base class of the errors a user can cause and fix: bad configuration, an unreachable
broker or database, a refused query or command. ``costline`` prints such an error as one line
(``costline: error: …``) and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CostlineError(Exception):
    """An error whose message says what is wrong and how to fix it, in one line."""
