"""`gpujob watch` shows a waiting job's place in its queue (and its estimated start) before the message."""

from __future__ import annotations

import io

from gpujob.bridge.cli import bar_line, render
from gpujob.events import make_event


def test_a_waiting_job_shows_its_position_and_estimated_start() -> None:
    event = make_event(
        "a1", "queued", 0.0, "position 3 in queue 'renders'", queue="renders", position=3,
        estimatedStart="2026-11-30T06:00:00Z", seq=4,
    )  # fmt: skip
    line = bar_line(event, 200)
    assert "#3 in queue renders, starts ~2026-11-30T06:00:00Z" in line and line.startswith("a1 [")
    out = io.StringIO()
    render(event, out, tty=False, as_json=False)
    assert out.getvalue().split(" ", 4)[4].startswith("#3 in queue renders, starts ~2026-11-30T06:00:00Z | position 3")


def test_without_a_position_the_message_is_shown_as_before() -> None:
    event = make_event("a1", "running", 40.0, "Epoch 2/5")
    out = io.StringIO()
    render(event, out, tty=False, as_json=False)
    assert out.getvalue().endswith(" a1 running 40.0% Epoch 2/5\n")
    assert "#" not in bar_line(make_event("a1", "queued", 0.0, "waiting", queue="renders"), 120)  # no position yet
