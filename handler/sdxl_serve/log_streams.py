"""Log records to stdout or stderr by their level, for a server that reads our output.

TorchServe 0.12's frontend reads a worker's stdout and stderr line by line and writes each
line of stdout to ``model_log.log`` at INFO and each line of stderr at WARN, whatever the line
says (``WorkerLifeCycle.ReaderThread``). Its worker sends Python logging to stdout, so our
warnings and errors (an out-of-memory split, an engine crash, a circuit breaker opening)
were INFO lines there, unseen by a log pipeline that alerts on WARN. The stream is the only
level a worker's line can carry: below WARNING goes to stdout, WARNING and above to stderr.
"""

from __future__ import annotations

import logging
import sys


def split_by_level(logger: logging.Logger, line_format: str) -> None:
    """Write ``logger``'s records below WARNING to stdout and the others to stderr, each as
    ``line_format`` says, and nowhere else: its own handlers are replaced, and it stops
    passing records to its parents' (which would write them a second time).

    Example:
        split_by_level(logging.getLogger("sdxl_serve"), "%(message)s")
    """
    below = logging.StreamHandler(sys.stdout)
    below.addFilter(lambda record: record.levelno < logging.WARNING)
    above = logging.StreamHandler(sys.stderr)
    above.setLevel(logging.WARNING)
    for handler in (below, above):
        handler.setFormatter(logging.Formatter(line_format))
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(below)
    logger.addHandler(above)
    logger.propagate = False
