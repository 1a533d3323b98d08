"""Named saving points where a fault campaign can stop or kill the process.

The saving code calls ``fault_point(point, *products)`` at each moment a kill could leave
something behind; it does nothing unless the environment variable ``SEECHANGE_FAULT_POINT``
names that point::

    SEECHANGE_FAULT_POINT=<point>:<kind>[:<count>[:<action>]]

``point`` is one of `POINTS`; ``kind`` is a product's class name (``Background``, ``Image``,
``Exposure``, ``CatalogExcerpt``, ...; ``schema`` for the migrations) or ``*`` for any;
``count`` picks the count-th time that point is reached for that kind in this process (default
1); ``action`` is ``kill`` (SIGKILL, the default: nothing of Python runs afterwards) or
``stop`` (SIGSTOP, so that a test can fill the disk or take the database away at that exact
moment, then send SIGCONT).  ``tests/reliability`` is the campaign that uses it
(``docs/reliability.md``).
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point", "POINTS", "ENVIRONMENT_VARIABLE"]

ENVIRONMENT_VARIABLE = "SEECHANGE_FAULT_POINT"

#: The saving points, in the order a save passes them.
POINTS = ("temp_written",    # a product's temporary file is complete and fsynced
          "file_in_place",   # ... and linked under its final name; no row yet
          "before_commit",   # every row of the save is flushed, the transaction is still open
          "after_commit")    # the rows are committed

_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
_reached: dict[str, int] = {}


def fault_point(point: str, *products: object) -> None:
    """Kill or stop this process here if ``SEECHANGE_FAULT_POINT`` names this point and kind.

    Parameters
    ----------
    point : str
        One of `POINTS`.
    *products : object or str
        The products being saved (their class names are their kinds), or kind names.
    """
    wanted = os.environ.get(ENVIRONMENT_VARIABLE)
    if not wanted:
        return
    fields = wanted.split(":")
    name, kind, count, action = fields + ["", "", "1", "kill"][len(fields):]
    kinds = {p if isinstance(p, str) else type(p).__name__ for p in products}
    if name != point or not (kind == "*" or kind in kinds):
        return
    _reached[wanted] = _reached.get(wanted, 0) + 1
    if _reached[wanted] == int(count):
        os.kill(os.getpid(), _ACTIONS[action])
