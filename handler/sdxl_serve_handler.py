"""TorchServe's entry point into the archive (``--handler`` of torch-model-archiver).

TorchServe imports the handler by its file name at the archive's top level, so this file is
all that lives there besides the ``sdxl_serve`` package. It forwards to the one handler
object of this worker process.
"""

from sdxl_serve.torchserve_handler import SDXLHandler

_handler = SDXLHandler()


def handle(data, context):
    """Initialise on the first call (``data`` is None at model load), then serve."""
    if not _handler.initialized:
        _handler.initialize(context)
    if data is None:
        return None
    return _handler.handle(data, context)
