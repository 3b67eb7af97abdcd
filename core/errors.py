"""The project's one exception type.

Every problem a user must act on (a bad config value, a missing file, unreadable data, a run that
cannot continue) raises `BifocalError` with a one-line message naming the key, file or value.
The CLI catches it once, prints the line and exits 2. It lives in its own torch-free module so its
identity is the same whether the CLI runs as the `bifocal` script or as `python -m
bifocal.launcher.cli` (where cli.py itself is `__main__`).
"""


class BifocalError(ValueError):
    """Bad input or a run that cannot go on; the message is one line saying what and where.

    Subclasses ValueError so code that validates generically (and Python's own dataclass
    conventions) still catches it.
    """
