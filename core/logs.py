"""Logging for every layer: Python `logging`, rank-aware, and one progress helper.

What a command prints as its result (a table, `bifocal env`'s rows, generated text, YAML, where
the results were written) stays a plain `print` on stdout. Everything else, what happens on the
way, goes through a layer's logger to stderr, one plain line a record:

    from bifocal.core import logs

    log = logs.get_logger(__name__)          # bifocal.eval.study -> the `bifocal.eval` logger
    log.info("training %s (%d steps)", name, steps)     # bifocal: training rope (200 steps)
    log.warning("no checkpoint in %s", run)             # bifocal: warning: no checkpoint in runs/x
    log.debug("plan: %s", plan)                         # shown with `bifocal --verbose`

    for run in logs.progress(runs, desc="study", unit="run", log=log):   # a tqdm bar on a terminal,
        ...                                                               # else a line per tenth
    with logs.progress(total=n, desc="ppl L=64", unit="windows", log=log) as bar:
        bar.set_postfix_str("batch 16")                                   # plain: ..., batch 16
        bar.update(k)

Loggers: one per layer, `bifocal.core`, `bifocal.model`, `bifocal.data_pipeline`, `bifocal.run`,
`bifocal.launcher`, `bifocal.eval`, under `bifocal`, which holds the one handler (stderr,
looked up at each record, so a redirected or captured stderr gets the lines). Python's warnings
of bifocal's own categories (DataWarning, PerplexityWarning) become one such warning line.

Ranks: the rank and world size are read from `RANK` / `WORLD_SIZE`, which every launcher sets
(DeepSpeed's, torchrun; `bifocal train` sets them from srun's). Only rank 0 logs unless
`--log-ranks` / `BIFOCAL_LOG_RANKS` names others (`all`, or `0,3`); in a world of more than one
rank every line starts with `[rankN]: `, as torch's own rank-prefixed lines do. Errors a command
fails with are printed by the CLI on every rank, whatever the settings (launcher/cli.py).

Level: `bifocal --quiet` (warnings and errors), `--verbose` (debug lines too), `--log-level`, or
`BIFOCAL_LOG_LEVEL` (debug | info | warning | error); a flag wins over the variable. `setup` is
called once by the CLI; imported as a library (a notebook, a test), bifocal logs at info on rank 0.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any, Iterable, Iterator

from .errors import BifocalError

LAYERS = ("core", "model", "data_pipeline", "run", "launcher", "eval")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LEVEL_ENV, RANKS_ENV = "BIFOCAL_LOG_LEVEL", "BIFOCAL_LOG_RANKS"
ROOT = logging.getLogger("bifocal")


def get_logger(name: str) -> logging.Logger:
    """The layer's logger for a module (`__name__`, e.g. "bifocal.eval.perplexity") or a layer
    name ("eval"). Raises ValueError for a name outside the layers."""
    parts = name.split(".")
    layer = parts[1] if parts[0] == "bifocal" and len(parts) > 1 else parts[0]
    if layer not in LAYERS:
        raise ValueError(f"{name!r} is in no layer of bifocal ({', '.join(LAYERS)})")
    return logging.getLogger(f"bifocal.{layer}")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process from `RANK` / `WORLD_SIZE`; (0, 1) outside a launcher."""
    return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)


class _RankFilter(logging.Filter):
    """Lets through the records of the ranks that log (`None`: all of them)."""

    ranks: frozenset[int] | None = frozenset({0})

    def filter(self, record: logging.LogRecord | None = None) -> bool:
        return self.ranks is None or rank_and_world()[0] in self.ranks


class _Formatter(logging.Formatter):
    """`[rankN]: ` (a world of more than one rank) `bifocal: ` `warning: ` (any level but info)
    then the message, on every line of it."""

    def format(self, record: logging.LogRecord) -> str:
        rank, world = rank_and_world()
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        prefix = (f"[rank{rank}]: " if world > 1 else "") + "bifocal: " + level
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time, through `tqdm.write` when tqdm is loaded so a
    line never lands inside a progress bar."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; stderr is looked up instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # One write a line: ranks share a pipe, and an unbuffered stream writes each call at once.
            line = self.format(record) + "\n"
            if "tqdm" in sys.modules:
                sys.modules["tqdm"].tqdm.write(line, file=sys.stderr, end="")
            else:
                sys.stderr.write(line)
            self.flush()
        except Exception:
            self.handleError(record)


_filter = _RankFilter()
_handler = _StderrHandler()
_handler.setFormatter(_Formatter())
_handler.addFilter(_filter)
ROOT.addHandler(_handler)
ROOT.setLevel(logging.INFO)
ROOT.propagate = False  # an application's own root handler would print every line twice


def parse_level(text: str, where: str) -> int:
    """The `logging` level for `debug | info | warning | error` (any case); raises BifocalError
    naming `where` (the flag or variable it came from) for anything else."""
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise BifocalError(f"{where} {text!r}: one of {', '.join(LEVELS)}")
    return level


def parse_ranks(text: str, where: str) -> frozenset[int] | None:
    """`all` -> None (every rank), `0,3` -> {0, 3}; raises BifocalError naming `where` for
    anything else."""
    if text.strip().lower() == "all":
        return None
    try:
        ranks = frozenset(int(r) for r in text.split(","))
    except ValueError:
        ranks = frozenset({-1})
    if min(ranks) < 0:
        raise BifocalError(f"{where} {text!r}: `all` or comma-separated rank numbers, e.g. 0,1")
    return ranks


def setup(level: str | None = None, ranks: str | None = None) -> None:
    """Configure bifocal's logging; the CLI calls it once per command. `level` (debug | info |
    warning | error) and `ranks` (`all` or `0,3`) come from the command line; None takes
    `BIFOCAL_LOG_LEVEL` / `BIFOCAL_LOG_RANKS`, else info on rank 0. Raises BifocalError for a value
    that is neither. Calling it again replaces the settings (nothing is added twice)."""
    ROOT.setLevel(parse_level(level, "--log-level") if level is not None else
                  parse_level(os.environ[LEVEL_ENV], LEVEL_ENV) if os.environ.get(LEVEL_ENV) else logging.INFO)
    _filter.ranks = (parse_ranks(ranks, "--log-ranks") if ranks is not None else
                     parse_ranks(os.environ[RANKS_ENV], RANKS_ENV) if os.environ.get(RANKS_ENV) else frozenset({0}))
    warnings.showwarning = _show_warning


def forward_args() -> list[str]:
    """The top-level `bifocal` options that give a child `bifocal` process (a launched rank, on any
    node) these settings; [] for the defaults. Put them before the command: `bifocal *ARGS train`."""
    args = [] if ROOT.level == logging.INFO else ["--log-level", logging.getLevelName(ROOT.level).lower()]
    if _filter.ranks != frozenset({0}):
        args += ["--log-ranks", "all" if _filter.ranks is None else ",".join(map(str, sorted(_filter.ranks)))]
    return args


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """bifocal's own warning categories as one log line; every other warning as Python shows it."""
    if category.__module__.startswith("bifocal."):
        get_logger(category.__module__).warning("%s", message)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _draws_bar(log: logging.Logger) -> bool:
    """A bar only where it can be read: info lines on, stderr a terminal, and one rank logging
    (bars of several ranks on one terminal overwrite each other)."""
    if not log.isEnabledFor(logging.INFO) or not _filter.filter():
        return False
    one_rank = rank_and_world()[1] == 1 or (_filter.ranks is not None and len(_filter.ranks) == 1)
    return one_rank and sys.stderr.isatty()


class PlainProgress:
    """The progress helper without a terminal: an info line `DESC: N/TOTAL UNIT[, POSTFIX]` at every
    1/`lines` of the total and at the end (`lines=0`: none; the caller logs its own lines), or,
    with no total, `DESC: N UNIT` every `interval` seconds and once at `close()`. Takes the calls
    of tqdm that bifocal uses: iteration, `update`, `set_postfix(_str)`, `close`, `with`."""

    plain = True

    def __init__(self, iterable: Iterable | None, total: float | None, desc: str, unit: str, initial: int,
                 unit_scale: bool, lines: int, interval: float, log: logging.Logger) -> None:
        self.iterable, self.desc, self.unit, self.unit_scale, self.log = iterable, desc, unit, unit_scale, log
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.postfix, self.interval, self.lines = total, initial, "", interval, lines
        self.tenth = int(initial * lines // total) if total else 0  # lines shown of `lines` (one per 1/lines)
        self.shown, self.last_time = initial, time.monotonic()

    def __iter__(self) -> Iterator:
        for item in () if self.iterable is None else self.iterable:
            yield item
            self.update()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _count(self, n: float) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(n)
        return f"{n:,}" if isinstance(n, int) else f"{n:g}"

    def _line(self) -> None:
        done = self._count(self.n) + (f"/{self._count(self.total)}" if self.total else "")
        sep = "" if self.unit_scale else " "  # 12.3MB, as tqdm writes it
        self.log.info("%s: %s%s%s%s", self.desc, done, sep, self.unit, f", {self.postfix}" if self.postfix else "")
        self.shown, self.last_time = self.n, time.monotonic()

    def update(self, n: float = 1) -> None:
        """Count `n` more units; logs a line when this crosses the next 1/`lines` of the total."""
        self.n += n
        if self.total and self.lines:
            reached = min(self.lines, int(self.n * self.lines // self.total))
            if reached > self.tenth:
                self.tenth = reached
                self._line()
        elif self.total is None and self.interval and time.monotonic() - self.last_time >= self.interval:
            self._line()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text appended to the next lines, as tqdm's `set_postfix_str` (`refresh` is ignored)."""
        self.postfix = s

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """`key=value, ...` appended to the next lines, as tqdm's `set_postfix` (`refresh` is ignored)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())

    def close(self) -> None:
        """End: with no total, log the count reached if it was not shown yet; no lines after this."""
        if self.total is None and self.interval and self.n != self.shown:
            self._line()
        self.interval = 0


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, unit_scale: bool = False, lines: int = 10, interval: float = 30.0,
             log: logging.Logger | None = None, disable: bool = False, **tqdm_kwargs: Any):
    """The one progress helper: a tqdm bar on stderr when it is a terminal (and this rank logs at
    info), else a `PlainProgress` that logs plain lines through `log` (default `bifocal.core`), so
    batch logs get no carriage returns or escape codes. `bar.plain` says which one it is.

    `lines`: plain lines per full total (10: one per tenth; 0: none, for a caller that logs its own);
    `interval`: seconds between plain lines when the total is unknown; `disable`: show nothing.
    Keyword arguments other than these go to tqdm (`leave`, `dynamic_ncols`, `mininterval`, ...)."""
    log = log or get_logger("core")
    if disable:
        lines = interval = 0
    elif _draws_bar(log):
        from tqdm import tqdm

        bar = tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                   file=sys.stderr, **tqdm_kwargs)
        bar.plain = False
        return bar
    return PlainProgress(iterable, total, desc, unit, initial, unit_scale, lines, interval, log)
