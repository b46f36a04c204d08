"""Seeded cases of the rebuild soak's cycles (``test_rebuild_soak``, opt-in there) that once
lost or wedged acknowledged data, kept in the default suite (about a second each).

- seed 116, 3 MNs r = 2: a put's round opened in an epoch where its subtable had no live
  backup (MN 0 dead); the epoch ended (MN 0's rebuild published) before its CAS, and the
  slot's primary, MN 1, died before the writer could read it. ``ClientCore.fate`` found no
  live MN of the round and took its verdict, reached from no backup at all, for a win: the
  put was acknowledged and lost. The slot's primary now (the rebuilt MN 0, copied from MN 1
  after the epoch ended) tells instead.
- with a slow MN (``SlowCycleRun``), seed 169 on 3 MNs r = 2 (and 207, 215, 226, 255): an
  update's backup CAS took effect on the slow MN 2 but its completion timed out; the primary
  MN 1 died, and the failover left MN 2's value (the proposal) in place without recording it,
  taking every writer of the round for one that had seen its proposal land. The writer, not
  knowing, started over and gave its object back to its free list while the slot named it;
  its retry replaced that value and freed the object again, by then reused for the next
  update (dangling: a live object freed). The failover now records every value it leaves in
  place on a subtable whose primary died, unless it is an object committed for the slot
  (``kept``), so the writer learns it won.
"""

from __future__ import annotations

import pytest
from test_rebuild import _check as check_rebuild
from test_rebuild_soak import CycleRun, SlowCycleRun


@pytest.mark.parametrize("seed,nodes,r", [(116, 3, 2)])
def test_rebuild_cycles_seed(seed, nodes, r):
    check_rebuild(seed, cls=CycleRun, nodes=nodes, r=r, crash_client=seed % 3 == 0)


@pytest.mark.parametrize("seed,nodes,r", [(169, 3, 2), (207, 5, 2), (215, 4, 3), (226, 5, 2),
                                          (255, 3, 2)])
def test_rebuild_cycles_with_a_slow_mn_seed(seed, nodes, r):
    check_rebuild(seed, cls=SlowCycleRun, nodes=nodes, r=r, crash_client=seed % 2 == 0)
