"""Errors raised by the video writer.

They derive from the pack-wide ``VramwiseError`` so the node adapter can show every one of them verbatim.
"""

from __future__ import annotations

from ..errors import InputError, VramwiseError

__all__ = ["EncodeCancelled", "FormatUnavailableError", "InputError"]


class FormatUnavailableError(VramwiseError):
    """The requested output format needs an encoder that the installed FFmpeg (inside PyAV) lacks."""

    def __init__(self, format_id: str, needed: str, available: list[str]) -> None:
        self.format_id = format_id
        fix = (
            f"pick one of the available formats ({', '.join(available) or 'none'}), or install a PyAV build "
            "whose bundled FFmpeg has that encoder (for example `pip install -U av` in ComfyUI's Python)."
        )
        super().__init__(f"format: '{format_id}' is not available here: {needed}. Fix: {fix}")


class EncodeCancelled(VramwiseError):
    """``should_cancel()`` returned True; the partial output has been removed."""
