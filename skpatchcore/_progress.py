"""Progress bars for long stages, shown only when ``verbose`` asks for them."""

import sys
import time


def progress_bar(total, description, unit, enabled):
    """A bar over ``total`` items of one stage, or a silent stand-in.

    With ``enabled``, the bar is tqdm's bar in a notebook, or on standard
    error when that is a terminal (``pip install "skpatchcore[progress]"``).
    Elsewhere, as in a log file, where tqdm's carriage returns and cursor
    moves (for the two bars of a fit) would garble the text, and without
    tqdm, a plain line is printed now and then with the count and the time
    left: on standard error in place of tqdm, on standard output without it.

    Parameters
    ----------
    total : int
        Items the stage will process.

    description : str
        Name of the stage, e.g. ``"features"``.

    unit : str
        What an item is, e.g. ``"images"``.

    enabled : bool
        False returns a bar that shows nothing.

    Returns
    -------
    bar : object
        Has ``update(n)`` and ``close()`` and is a context manager.
    """
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PrintedProgress(total, description, unit, sys.stdout)
    if _is_notebook_bar() or _is_terminal(sys.stderr):
        return tqdm(total=total, desc=description, unit=f" {unit}", leave=True)
    return _PrintedProgress(total, description, unit, sys.stderr)


def _is_notebook_bar():
    """Whether ``tqdm.auto`` chose the notebook widget, which has no escapes."""
    # tqdm.auto's class always derives from a new class; the choice it made
    # is autonotebook's, which tqdm.auto has imported.
    from tqdm import autonotebook, std

    return autonotebook.tqdm is not std.tqdm


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # No isatty, or a closed stream.
        return False


class _Silent:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _PrintedProgress(_Silent):
    """Count, elapsed and remaining time, one line at most every few seconds."""

    _INTERVAL = 5.0

    def __init__(self, total, description, unit, stream):
        self.total, self.description, self.unit = total, description, unit
        self.stream = stream
        self.done = 0
        self.start = self.last = time.perf_counter()
        self._print()

    def update(self, n=1):
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total or now - self.last >= self._INTERVAL:
            self.last = now
            self._print()

    def _print(self):
        elapsed = time.perf_counter() - self.start
        line = f"[skpatchcore] {self.description}: {self.done}/{self.total} {self.unit}"
        line += f", {elapsed:.0f} s elapsed"
        if 0 < self.done < self.total:
            line += (
                f", about {elapsed * (self.total - self.done) / self.done:.0f} s left"
            )
        print(line, file=self.stream, flush=True)
