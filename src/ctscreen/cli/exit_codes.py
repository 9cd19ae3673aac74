"""The exit codes of every ``ctscreen`` command (a leaf module the commands import)."""

from __future__ import annotations

#: Everything succeeded.
EXIT_OK = 0
#: The command ran but some studies (rows) failed.
EXIT_PARTIAL = 1
#: The command could not run (bad arguments, missing weights, unreadable config).
EXIT_ERROR = 2
#: Stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it); what was
#: finished is kept and ``--resume`` continues.
EXIT_INTERRUPTED = 130
