import io
import sys

import pytest

from skpatchcore._progress import progress_bar

pytest.importorskip("tqdm")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _two_stages(stream, monkeypatch):
    """Two bars open at once, as a fit's features and coreset stages are."""
    monkeypatch.setattr(sys, "stderr", stream)
    with (
        progress_bar(3, "features", "images", True) as images,
        progress_bar(4, "coreset", "patches", True) as patches,
    ):
        for _ in range(3):
            images.update(1)
        patches.update(4)
    return stream.getvalue()


def test_a_log_gets_plain_lines_without_escapes(monkeypatch):
    text = _two_stages(io.StringIO(), monkeypatch)
    assert "\x1b[" not in text and "\r" not in text
    lines = text.splitlines()
    # One line when each stage starts, one when it ends.
    assert lines == [
        "[skpatchcore] features: 0/3 images, 0 s elapsed",
        "[skpatchcore] coreset: 0/4 patches, 0 s elapsed",
        "[skpatchcore] features: 3/3 images, 0 s elapsed",
        "[skpatchcore] coreset: 4/4 patches, 0 s elapsed",
    ]


def test_a_terminal_gets_tqdm_bars(monkeypatch):
    text = _two_stages(_Terminal(), monkeypatch)
    # tqdm redraws in place, and moves the cursor up for the second bar.
    assert "\r" in text and "\x1b[A" in text
    assert "3/3" in text and "4/4" in text


def test_disabled_bars_print_nothing(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(3, "features", "images", False) as bar:
        bar.update(3)
    assert sys.stderr.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_a_notebook_gets_tqdm_bars(monkeypatch):
    from tqdm import autonotebook
    from tqdm.auto import tqdm

    # In a notebook, tqdm.auto picks a widget, and stderr is no terminal.
    monkeypatch.setattr(autonotebook, "tqdm", type("WidgetBar", (), {}))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(3, "features", "images", True) as bar:
        assert isinstance(bar, tqdm)
