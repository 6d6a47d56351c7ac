"""Errors the user can act on.

Every error raised for bad input names the input (as the user sees it on the node) and the fix, because
ComfyUI shows the message verbatim in its error dialog and users cannot read a traceback to guess.
"""

from __future__ import annotations


class VramwiseError(Exception):
    """Base class for errors raised by the pack on purpose (not bugs)."""


class InputError(VramwiseError, ValueError):
    """A node input has a value the pack cannot use."""

    def __init__(self, input_name: str, problem: str, fix: str) -> None:
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{input_name}: {problem} Fix: {fix}")


class ModelFolderError(VramwiseError):
    """A model folder is missing, corrupt or of an architecture the pack does not support."""


class SamplingError(VramwiseError):
    """Sampling finished but produced something unusable (NaN/inf latents)."""
