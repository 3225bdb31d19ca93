"""Plain progress lines (no terminal: CI logs, `nohup`) say how far a step is and when it will end."""

from __future__ import annotations

import pytest

from pipeline import progress as prog


def test_eta_is_the_remaining_items_at_the_observed_rate() -> None:
    # 10 of 40 items in 30 s: 30 more items at 3 s each
    assert prog.eta_text(10, 40, 30.0) == ", 0m30s elapsed, ETA 1m30s"
    assert prog.eta_text(1, 3, 3725.0) == ", 1h02m elapsed, ETA 2h04m"


def test_no_eta_before_the_first_item_without_a_total_or_when_done() -> None:
    assert prog.eta_text(0, 40, 5.0) == ", 0m05s elapsed"
    assert prog.eta_text(7, None, 5.0) == ", 0m05s elapsed"
    assert prog.eta_text(40, 40, 65.0) == ", 1m05s elapsed"


def test_progress_lines_carry_count_rate_and_eta(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    clock = iter(range(0, 1000, 5))  # each monotonic() call advances 5 s
    monkeypatch.setattr(prog.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    assert list(prog.progress(range(4), total=4, desc="episodes", every_s=10.0)) == [0, 1, 2, 3]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    # t0=0; item 1 at 5 s (no line), item 2 at 10 s: 2/4 at 0.2/s, 10 s elapsed, 10 s to go
    assert lines[0] == "[fewscan] episodes: 2/4 (0.2/s, 0m10s elapsed, ETA 0m10s)"


def test_a_resumed_bar_estimates_from_this_process_steps_only(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    clock = iter([0.0, 20.0, 40.0])
    monkeypatch.setattr(prog.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    bar = prog.Bar(total=100, desc="meta-train", initial=50, every_s=10.0)
    bar.update(10, loss=0.5)  # 10 steps in 20 s since the resume: 40 more take 80 s
    assert (
        capsys.readouterr().err.strip() == "[fewscan] meta-train: 60/100 loss=0.5, 0m20s elapsed, ETA 1m20s"
    )
    bar.update(40)
    assert capsys.readouterr().err.strip() == "[fewscan] meta-train: 100/100, 0m40s elapsed"
