"""Seeded cases of the rebuild soak's cycles (``test_rebuild_soak``, opt-in there) that once
lost or wedged acknowledged data, kept in the default suite (about a second each).

- seed 116, 3 MNs r = 2: a put's round opened in an epoch where its subtable had no live
  backup (MN 0 dead); the epoch ended (MN 0's rebuild published) before its CAS, and the
  slot's primary, MN 1, died before the writer could read it. ``ClientCore.fate`` found no
  live MN of the round and took its verdict, reached from no backup at all, for a win: the
  put was acknowledged and lost. The slot's primary now (the rebuilt MN 0, copied from MN 1
  after the epoch ended) tells instead.
"""

from __future__ import annotations

import pytest
from test_rebuild import _check as check_rebuild
from test_rebuild_soak import CycleRun


@pytest.mark.parametrize("seed,nodes,r", [(116, 3, 2)])
def test_rebuild_cycles_seed(seed, nodes, r):
    check_rebuild(seed, cls=CycleRun, nodes=nodes, r=r, crash_client=seed % 3 == 0)
