"""User-facing errors: one line naming the value, the rule and the fix; exit status 2."""


class UserError(ValueError):
    """A mistake in the user's input. The CLI prints the message alone (no traceback), exits 2."""

    exit_code = 2


def nearest(word: str, choices: list[str]) -> str | None:
    """The closest valid spelling of `word`, for 'did you mean' hints."""
    import difflib

    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return match[0] if match else None
