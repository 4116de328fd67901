"""TorchServe's entry point into the archive (``--handler`` of torch-model-archiver).

TorchServe imports the handler by its file name at the archive's top level, so this file is
all that lives there besides the ``sdxl_serve`` package. It forwards to the one handler
object of this worker process.
"""

import logging

from sdxl_serve.log_streams import split_by_level
from sdxl_serve.torchserve_handler import SDXLHandler

# TorchServe writes what a worker prints to stdout at INFO and to stderr at WARN, and its
# worker prints each record's message alone (model_service_worker.py): ours the same way,
# warnings and errors to stderr. TorchServe's own records stay as its worker set them.
split_by_level(logging.getLogger("sdxl_serve"), "%(message)s")

_handler = SDXLHandler()


def handle(data, context):
    """Initialise on the first call (``data`` is None at model load), then serve."""
    if not _handler.initialized:
        _handler.initialize(context)
    if data is None:
        return None
    return _handler.handle(data, context)
