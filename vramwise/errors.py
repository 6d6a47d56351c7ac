"""Errors the user can act on.

Every error raised for bad input names the input (as the user sees it on the node) and the fix, because
ComfyUI shows the message verbatim in its error dialog and users cannot read a traceback to guess.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class VramwiseError(Exception):
    """Base class for errors raised by the pack on purpose (not bugs)."""


class InputError(VramwiseError, ValueError):
    """A node input has a value the pack cannot use."""

    def __init__(self, input_name: str, problem: str, fix: str) -> None:
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{input_name}: {problem} Fix: {fix}")


def parse_choice(choices: type[E], value: str, input_name: str, what: str) -> E:
    """``value`` as a member of the str enum ``choices``, or an InputError naming the input and every choice
    (ComfyUI 0.3.75 does not check V3 combo values against their options, so an API prompt can send anything)."""
    try:
        return choices(value)
    except ValueError:
        names = ", ".join(m.value for m in choices)
        raise InputError(input_name, f"'{value}' is not a known {what}.", f"pick one of {names}.") from None


class ModelFolderError(VramwiseError):
    """A model folder is missing, corrupt or of an architecture the pack does not support."""


class SamplingError(VramwiseError):
    """Sampling finished but produced something unusable (NaN/inf latents)."""
