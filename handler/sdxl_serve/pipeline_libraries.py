"""torch, diffusers and diffusers' SDXL pipeline, imported without the libraries' notes about
themselves (``log_streams.import_notes_held``: seven WARN lines in the model log at every
worker start, and at every engine start with a CUDA torch).

Importing this module is what it is for: the engine processes' fork server preloads it, and
an engine process imports it before its first use of diffusers (with a CUDA torch nothing
is preloaded, ``engine_process.fork_server``).
"""

from sdxl_serve.log_streams import import_notes_held

with import_notes_held():
    import torch  # noqa: F401
    import diffusers  # noqa: F401
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl  # noqa: F401
