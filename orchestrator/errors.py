"""The one exception type the command line turns into a one-line message (exit status 2), and the
folder-making that outputs and stores share, which would otherwise end in an OSError traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input from the user: a file, a key, a value. The message names it and what is allowed."""


def make_folder(folder: Path, what: str) -> None:
    """Make ``folder`` (and its parents) if missing; where that fails, a ``UserError`` of ``what``
    (the option and path it is for) and the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # A file at the folder itself (FileExistsError) or at one of its parents (NotADirectoryError).
        in_the_way = isinstance(exc, (FileExistsError, NotADirectoryError))
        reason = "a file is in the way" if in_the_way else exc.strerror or exc
        raise UserError(f"{what} ({reason})") from None
