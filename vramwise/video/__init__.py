"""Video and animated-image writing for IMAGE clips, without ComfyUI.

Public API::

    available_formats() -> list[str]
    encode_video(images, output_path, format_id, fps, options, *, audio, metadata, on_progress, should_cancel,
                 overwrite) -> EncodeResult
    save_video(images, base_dir, filename_prefix, format_id, fps, options, **same keywords) -> EncodeResult
    resolve_output_path(base_dir, filename_prefix, extension) -> (full_path, subfolder, filename)
    probe(path) -> VideoInfo
    read_metadata(path) -> dict[str, str]
    read_frames(path, limit=None) -> np.ndarray  (tests / short clips only)
"""

from .errors import EncodeCancelled, FormatUnavailableError
from .formats import FORMATS, FormatSpec, available_formats, get_format, pix_fmts_for
from .job import EncodeOptions, EncodeResult
from .metadata import read_metadata
from .paths import resolve_output_path
from .probe import VideoInfo, probe, read_frames
from .writer import encode_video, save_video

__all__ = [
    "FORMATS",
    "EncodeCancelled",
    "EncodeOptions",
    "EncodeResult",
    "FormatSpec",
    "FormatUnavailableError",
    "VideoInfo",
    "available_formats",
    "encode_video",
    "get_format",
    "pix_fmts_for",
    "probe",
    "read_frames",
    "read_metadata",
    "resolve_output_path",
    "save_video",
]
