"""Log format and progress bars of the `lemo` command (the harness; the library only calls getLogger).

`configure_logging` (called once by `lemo.bench.cli.main`) gives the `lemo` logger one stderr handler
with one format; `progress` wraps a loop in a tqdm bar on stderr, shown only while the `lemo` logger
is enabled for INFO (so `lemo --quiet`, and code that never configured logging, such as the tests,
draw no bars).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    """Writes to the current sys.stderr, above any progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # pragma: no cover - as logging.StreamHandler does
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """One handler (stderr, FORMAT) on the `lemo` logger at `level`; calling it again replaces it."""
    logger = logging.getLogger("lemo")
    for handler in list(logger.handlers):
        if getattr(handler, "_lemo_cli", False):
            logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler._lemo_cli = True
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)


def progress_enabled() -> bool:
    """Whether bars are drawn: the `lemo` logger is enabled for INFO (the CLI without --quiet)."""
    return logging.getLogger("lemo").isEnabledFor(logging.INFO)


def progress(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)` on stderr, disabled unless progress_enabled() (or `disable=` given)."""
    from tqdm import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    isatty = getattr(kwargs["file"], "isatty", None)
    if not (isatty and isatty()):  # a log file: a line now and then, not one per update
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
