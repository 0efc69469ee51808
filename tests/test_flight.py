"""The flight recorder's verdict from the ranks' reports (the end-to-end case, a rank stalled in another
collective, is in test_faults)."""

from __future__ import annotations

import pytest

from parallel.flight import verdict

pytestmark = pytest.mark.unit

WORLD = "group 0 of ranks [0, 1, 2]"


def _report(count: int, *calls) -> dict:
    return {"counts": [[WORLD, count]], "calls": [[WORLD, n, op, shape] for n, op, shape in calls]}


def test_the_rank_behind_and_the_call_it_never_entered_are_named():
    reports = {0: _report(7, (6, "broadcast", []), (7, "all_reduce", [4])),
               1: _report(6, (6, "broadcast", [])),
               2: _report(7, (7, "all_reduce", [4]))}
    assert verdict(reports, 3) == (f"rank(s) [1] never entered all_reduce #7 (shape [4]) on {WORLD}, in which "
                                   f"rank(s) [0, 2] wait; rank 1 is in broadcast #6 (shape []) on {WORLD}")


def test_a_silent_rank_is_named_with_the_call_the_others_wait_in():
    reports = {0: _report(3, (3, "all_gather", [2, 8])), 1: _report(3, (3, "all_gather", [2, 8]))}
    assert verdict(reports, 3) == (f"rank(s) [2] never entered all_gather #3 (shape [2, 8]) on {WORLD}, in which "
                                   f"rank(s) [0, 1] wait; rank 2 sent no report (stalled outside any collective, "
                                   f"or gone)")


def test_no_rank_behind_is_a_slow_collective():
    reports = {r: _report(2, (2, "all_reduce", [1])) for r in range(3)}
    assert verdict(reports, 3) == "every rank entered the same calls (a slow collective, not a missing one)"


def test_bytes_sent_are_what_ring_algorithms_send():
    """Per rank, for a 400-byte tensor: an all-reduce sends 2(n-1)/n of it, an all-gather (n-1)/n of its output,
    a reduce-scatter and an all-to-all (n-1)/n of their input, a send all of it, a receive nothing."""
    from parallel.flight import bytes_sent

    assert [bytes_sent("all_reduce", 400, n) for n in (1, 2, 4)] == [0, 400, 600]
    assert bytes_sent("all_gather_into_tensor", 400, 4) == 300
    assert bytes_sent("reduce_scatter_tensor", 400, 4) == bytes_sent("all_to_all_single", 400, 4) == 300
    assert (bytes_sent("send", 400, 2), bytes_sent("recv", 400, 2)) == (400, 0)
