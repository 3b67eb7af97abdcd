"""The one exception the CLI turns into a one-line message and exit code 2.

It lives in its own module so its identity is the same whether the CLI runs as the `bifocal`
script or as `python -m bifocal.launcher.cli` (where cli.py itself is `__main__`)."""


class UserError(Exception):
    """A problem with the user's input or data: printed as one line, exit code 2."""
