"""The server-wide output budget (``dimse_async.budget``), driven without sockets."""

from __future__ import annotations

from dimse_async.budget import OutputBudget


class Holder:
    """Stands for an association: what its transport holds now."""

    def __init__(self, live: int = 0):
        self.live = live

    def buffered_output(self) -> int:
        return self.live


def test_reports_add_up_and_closing_frees() -> None:
    budget = OutputBudget(100)
    a, b = Holder(), Holder()
    budget.report(a, 60)
    budget.report(b, 30)
    assert budget.total == 90 and budget.holders == 2 and not budget.over(0.0)
    budget.report(a, 80)
    assert budget.total == 110
    budget.report(a, 0)
    assert budget.total == 30 and budget.holders == 1


def test_over_recounts_stale_reports_from_live_sizes() -> None:
    budget = OutputBudget(100, recount_interval=1.0)
    reader, hog = Holder(live=0), Holder(live=90)
    budget.report(reader, 50)  # stale: this peer has read it all since
    budget.report(hog, 90)
    assert budget.over(10.0) is False  # recounted: 90
    assert budget.total == 90 and budget.holders == 1
    hog.live = 150
    budget.report(hog, 150)
    assert budget.over(10.5) is True  # within the interval: no recount needed, still over
    hog.live = 20  # the peer read meanwhile, unreported
    assert budget.over(10.9) is True  # no recount before the interval
    assert budget.over(11.0) is False


def test_no_limit_is_never_over() -> None:
    budget = OutputBudget(None)
    budget.report(Holder(), 1 << 40)
    assert not budget.over(0.0)
