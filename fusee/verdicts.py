"""The verdicts of a SNAPSHOT round, defined once for every module that reaches or reads one.

A writer's round ends in WIN (its value is, or will be, the slot's), LOSE (another writer's
value is) or RESTART (nobody's write happened: the slot froze for a split, or a failover took
the round back). RULE3 is no verdict but ``decide``'s answer that the backups alone cannot
tell (``fusee.replication``). FRESH is what an operation's body returns when a failover
dropped its proposal: it starts over with a new object (``fusee.membership``, ``dropped``).

They are plain strings typed as Literals, not an Enum: a verdict is compared a few times per
operation on the fast path, and a module-level string compares as fast as anything in Python
while mypy still checks that no other string is passed for one.

Design: docs/design.md#snapshot-replication.
"""

from __future__ import annotations

from typing import Final, Literal

Verdict = Literal["win", "lose", "restart"]
#: what the backups' values alone say (``fusee.replication.decide``)
Decision = Literal["win", "lose", "restart", "rule3"]
#: an operation's body asking to start over with a new object
Fresh = Literal["fresh"]

WIN: Final = "win"
LOSE: Final = "lose"
RESTART: Final = "restart"
RULE3: Final = "rule3"
FRESH: Final = "fresh"
