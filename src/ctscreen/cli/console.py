"""Lines for the person at the terminal, printed so that progress bars stay intact.

tqdm redraws its bar on one line of stderr; anything else written to stderr while
a bar is drawn lands in the middle of it. :func:`echo` goes through ``tqdm.write``,
which clears the bar, prints the line and redraws the bar below it; log records take
the same way through tqdm's own ``logging_redirect_tqdm`` (set up in ``cli.main``).
"""

from __future__ import annotations

import sys


def echo(text: str) -> None:
    """Print one line to stderr above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)
