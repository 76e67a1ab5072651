"""The one exception users see: a one-line message that names the thing to fix."""


class CpiftError(Exception):
    """Bad input or state. The CLI prints ``error: <message>`` and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
