"""User-facing errors.

`RingjaxError` is raised for anything the user can fix (bad paths, malformed data, impossible
budgets). The CLI prints its message as one line and exits non-zero, without a traceback, so
every message must name the problem and the fix.
"""


class RingjaxError(Exception):
    """A problem the user can fix; its message names the problem and what to do."""
