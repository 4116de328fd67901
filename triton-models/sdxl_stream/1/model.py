"""Triton loads this file; the model is the sdxl_serve package's adapter (triton_model.py)."""

from sdxl_serve.triton_model import TritonPythonModel  # noqa: F401 - what Triton looks for
