"""Lines for the person at the terminal, printed so that progress bars stay intact.

tqdm redraws its bar on one line of stderr; anything else written to stderr while
a bar is drawn lands in the middle of it. :func:`echo` and :class:`TqdmHandler`
go through ``tqdm.write``, which clears the bar, prints the line and redraws the
bar below it.
"""

from __future__ import annotations

import logging
import sys


def echo(text: str) -> None:
    """Print one line to stderr above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


class TqdmHandler(logging.Handler):
    """A logging handler that writes each record with ``tqdm.write`` to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            echo(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
