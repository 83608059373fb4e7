"""The one exception users see: a single line naming the problem and what is valid."""


class SlimtuneError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with code 2, no traceback.

    The message is kept on one line by construction: line breaks that come from quoted user values
    (a YAML key, a CSV cell) or from a library's message are shown escaped as ``\\n``."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *args)


def did_you_mean(value: str, valid) -> str:
    """A short hint listing the valid choices, closest first."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid: {', '.join(valid)}"
