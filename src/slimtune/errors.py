"""The one exception users see: a single line naming the problem and what is valid."""


class SlimtuneError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with code 2, no traceback."""


def did_you_mean(value: str, valid) -> str:
    """A short hint listing the valid choices, closest first."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid: {', '.join(valid)}"
