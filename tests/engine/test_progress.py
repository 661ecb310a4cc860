"""Progress bars: live on a terminal, plain lines in a log, nothing when off."""

import io

from evomerge.engine.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _work(bar, steps=5):
    for _ in range(steps):
        bar.update(1)
        bar.set_postfix_str("best 0.5")
    bar.close()


def test_a_bar_into_a_log_writes_whole_lines_and_no_carriage_return():
    log = io.StringIO()
    _work(progress_bar(stream=log, total=5, desc="search", unit="trial"))
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("search:") and "0/5" in lines[0]  # when it starts
    assert "5/5" in lines[-1] and "best 0.5" in lines[-1]  # and when it ends
    assert len(lines) == 2  # five quick updates: no line in between (one every LINE_EVERY_S)


def test_a_log_bar_writes_a_line_per_update_when_they_are_far_enough_apart():
    log = io.StringIO()
    bar = progress_bar(stream=log, total=3, desc="merging", mininterval=0)
    for _ in range(3):
        bar.update(1)
        bar.refresh()  # nothing new: no second line
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]  # no repeats


def test_a_bar_on_a_terminal_is_live_and_a_disabled_bar_writes_nothing():
    terminal = Terminal()
    bar = progress_bar(stream=terminal, total=2, desc="search")
    assert not isinstance(bar, LineProgress)
    _work(bar, 2)
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    _work(progress_bar(enabled=False, stream=quiet, total=2, desc="search"), 2)
    assert quiet.getvalue() == ""
