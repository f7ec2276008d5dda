"""User-facing errors: one line naming the value, the rule and the fix; exit status 2."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in the user's input. The CLI prints the message alone (no traceback), exits 2."""

    exit_code = 2


def nearest(word: str, choices: list[str]) -> str | None:
    """The closest valid spelling of `word`, for 'did you mean' hints."""
    import difflib

    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return match[0] if match else None


_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
    errno.EACCES: "permission denied; fix the permissions or choose another path",
    errno.EPERM: "operation not permitted; fix the permissions or choose another path",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of the path is not a folder; check the path",
    errno.EISDIR: "it is a folder, a file was expected; check the path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EIO: "an input/output error; check the disk",
}
_MACHINE_STATE = (errno.ENOSPC, errno.EDQUOT)
"""Not a bug whichever file meets it (a write into an open file reports no name at all): the
fix is the same, free space."""


def os_error_line(err: OSError, user_paths: Iterable[str]) -> str | None:
    """One line for an OS error on a path the user gave (the file, a file inside that folder,
    or a folder on the way to it), with the fix; None for any other file (torch's, inductor's
    cache, a device): that one is not the user's to fix."""
    fix = _OS_FIXES.get(err.errno or 0)
    if fix is None:
        return None
    names = [n for n in (err.filename, err.filename2) if isinstance(n, (str, bytes, os.PathLike))]
    if err.errno in _MACHINE_STATE:
        return f"{os.fsdecode(names[0])}: {fix}" if names else f"{err.strerror or err}: {fix}"
    if not names:
        return None
    local = [os.fsdecode(p) for p in user_paths if p and "://" not in os.fsdecode(p)]
    given = {_absolute(p) for p in local} | {os.path.realpath(p) for p in local}
    for name in names:
        path = _absolute(name)
        if any(_related(path, g) or _related(os.path.realpath(path), g) for g in given):
            return f"{os.fsdecode(name)}: {fix}"
    return None


def _absolute(path) -> str:
    return os.path.normpath(os.path.abspath(os.fsdecode(path)))


def _related(path: str, given: str) -> bool:
    """`path` is `given`, inside it, or a folder on the way to it (creating it failed there)."""
    inside = path == given or path.startswith(given.rstrip("/") + "/")
    return inside or (path != "/" and given.startswith(path.rstrip("/") + "/"))


def as_user_error(err: BaseException, user_paths: Iterable[str]) -> BaseException:
    """`err`, or the UserError an OS error on one of `user_paths` stands for (its one line)."""
    if isinstance(err, OSError):
        line = os_error_line(err, user_paths)
        if line is not None:
            user = UserError(line)
            user.__cause__ = err
            return user
    return err
