"""Log records to stdout or stderr by their level, for a server that reads our output.

TorchServe 0.12's frontend reads a worker's stdout and stderr line by line and writes each
line of stdout to ``model_log.log`` at INFO and each line of stderr at WARN, whatever the line
says (``WorkerLifeCycle.ReaderThread``). Its worker sends Python logging to stdout, so our
warnings and errors (an out-of-memory split, an engine crash, a circuit breaker opening)
were INFO lines there, unseen by a log pipeline that alerts on WARN. The stream is the only
level a worker's line can carry: below WARNING goes to stdout, WARNING and above to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

# What importing diffusers' SDXL pipeline makes libraries say about themselves, at every
# worker start (the fork server's imports) and, with a CUDA torch, at every engine start:
# seven WARN lines in the model log with the pinned versions, none about this package or
# anything an operator could act on: torchao's CUDA kernels that a CPU torch cannot load,
# torch deprecating how torchao registers two enums, diffusers unable to import torchao
# tensor classes (for checkpoints saved by torchao, which we never load: safetensors only)
# and transformers' note that torchvision is missing (its image processors, unused here).
# transformers imports torchao for its quantizers whenever torchao is installed, and it is
# (the int8 speed switch). Each logger is named, so that any other warning still shows.
IMPORT_NOTE_LOGGERS = ("torchao", "torch.utils._pytree",
                       "diffusers.quantizers.torchao.torchao_quantizer",
                       "transformers.utils.import_utils")


@contextlib.contextmanager
def import_notes_held() -> Iterator[None]:
    """Keep ``IMPORT_NOTE_LOGGERS`` to errors for the imports made inside, then as they
    were: a warning they give later (the int8 switch's torchao) still shows."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOTE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
