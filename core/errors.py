"""The project's one exception type.

Every problem a user must act on (a bad config value, a missing file, unreadable data, a run that
cannot continue) raises `BifocalError` with a one-line message naming the key, file or value.
The CLI catches it once, prints the line and exits 2. It lives in its own torch-free module so its
identity is the same whether the CLI runs as the `bifocal` script or as `python -m
bifocal.launcher.cli` (where cli.py itself is `__main__`).
"""


def escaped(text: str) -> str:
    """`text` with every control or line-break character written as its escape, as `repr` writes
    it (a newline as `\\n`, U+2028 as `\\u2028`): whatever a key, path, value or document a user
    gave holds, a message that quotes it stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class BifocalError(ValueError):
    """Bad input or a run that cannot go on; the message is one line saying what and where.

    The message is escaped on construction (`escaped`), so user input quoted in it cannot break
    the one-line rule. Subclasses ValueError so code that validates generically (and Python's own
    dataclass conventions) still catches it.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(escaped(str(message)), *args)
