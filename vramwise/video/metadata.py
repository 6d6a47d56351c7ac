"""Embedding ComfyUI's ``prompt``/``workflow`` JSON where each format's readers look for it.

Conventions (one key per tag everywhere, values are the JSON strings unchanged):
- MP4/MOV: container tags written with ``movflags=use_metadata_tags`` (QuickTime ``mdta`` keys), names kept.
- WebM: Matroska SimpleTags; FFmpeg's muxer stores the names upper-cased (PROMPT, WORKFLOW), the same bytes
  ComfyUI's own SaveWEBM produces, which is what its frontend reads.
- PNG: ``tEXt`` chunks (``iTXt`` when a value is not Latin-1) in the first file, like ComfyUI's SaveImage.
- WebP: EXIF IFD0 strings ``"<key>:<value>"``; prompt in 0x0110 (Model), workflow in 0x010F (Make), further keys
  counting down from 0x010E, the convention of ComfyUI's SaveAnimatedWEBP.
- GIF: one Comment Extension per key holding ``"<key>:<value>"``, right after the global colour table.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from typing import Any

from PIL import Image

from .errors import InputError


def normalize_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """Validated str->str copy; non-string values (e.g. a prompt dict) are JSON-encoded."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InputError("metadata", f"expected a dict, got {type(metadata).__name__}.", "pass {'prompt': json, ...}.")
    clean: dict[str, str] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if not isinstance(key, str) or not key or len(key) > 79 or ":" in key or not key.isprintable():
            raise InputError(
                "metadata", f"key {key!r} cannot be stored in every format.", "use 1-79 printable characters, no ':'."
            )
        clean[key] = value if isinstance(value, str) else json.dumps(value)
    return clean


def _ascii(value: str) -> str:
    """EXIF ASCII fields and GIF comments are 7-bit; JSON can be re-escaped without changing what it means."""
    if value.isascii():
        return value
    try:
        return json.dumps(json.loads(value), ensure_ascii=True)
    except ValueError:
        return value.encode("ascii", "backslashreplace").decode("ascii")


# --- PNG ---------------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_text_chunks(metadata: dict[str, str]) -> bytes:
    out = b""
    for key, value in metadata.items():
        try:
            out += _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
        except UnicodeEncodeError:
            # iTXt: keyword, compression flag 0, method 0, empty language tag, empty translated keyword, UTF-8 text.
            out += _png_chunk(b"iTXt", key.encode("latin-1", "replace") + b"\0\0\0\0\0" + value.encode("utf-8"))
    return out


def insert_png_text(png: bytes, metadata: dict[str, str]) -> bytes:
    """The PNG with text chunks placed right after IHDR (before IDAT, so readers that stop early see them)."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    ihdr_end = len(_PNG_SIGNATURE) + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:ihdr_end] + png_text_chunks(metadata) + png[ihdr_end:]


# --- WebP --------------------------------------------------------------------------------------------------

_EXIF_PROMPT, _EXIF_WORKFLOW = 0x0110, 0x010F


def webp_exif_payload(metadata: dict[str, str]) -> bytes:
    exif = Image.Exif()
    next_tag = 0x010E
    for key, value in metadata.items():
        if key == "prompt":
            tag = _EXIF_PROMPT
        elif key == "workflow":
            tag = _EXIF_WORKFLOW
        else:
            tag, next_tag = next_tag, next_tag - 1
        exif[tag] = f"{key}:{_ascii(value)}"
    data = exif.tobytes()
    return data[6:] if data.startswith(b"Exif\0\0") else data  # the WebP EXIF chunk holds bare TIFF data


def add_webp_exif(path: str, exif: bytes, width: int, height: int) -> None:
    """Append an EXIF chunk and flag it in VP8X, turning a simple (single-frame) WebP into the extended form."""
    chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif + (b"\0" if len(exif) % 2 else b"")
    with open(path, "r+b") as f:
        head = f.read(30)
        if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
            raise ValueError(f"{path} is not a WebP file")
        if head[12:16] == b"VP8X":
            f.seek(20)
            f.write(bytes([head[20] | 0x08]))
            f.seek(0, os.SEEK_END)
            f.write(chunk)
            size = f.tell() - 8
            f.seek(4)
            f.write(struct.pack("<I", size))
            return
        # Simple format: one small frame, so rewriting it whole is cheap.
        f.seek(12)
        body = f.read()
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0])
        vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        payload = b"WEBP" + vp8x + body + chunk
        f.seek(0)
        f.write(b"RIFF" + struct.pack("<I", len(payload)) + payload)
        f.truncate()


def read_webp_exif(path: str) -> dict[str, str]:
    with Image.open(path) as im:
        exif = im.getexif()
    out = {}
    for value in exif.values():
        if isinstance(value, str) and ":" in value:
            key, _, text = value.partition(":")
            out[key] = text
    return out


# --- GIF ---------------------------------------------------------------------------------------------------


def gif_comment_blocks(metadata: dict[str, str]) -> bytes:
    out = b""
    for key, value in metadata.items():
        data = f"{key}:{_ascii(value)}".encode("ascii")
        out += b"\x21\xfe"
        for start in range(0, len(data), 255):
            piece = data[start : start + 255]
            out += bytes([len(piece)]) + piece
        out += b"\x00"
    return out


def add_gif_comments(path: str, metadata: dict[str, str]) -> None:
    """Insert comment extensions after the header and global colour table, streaming the rest of the file."""
    tmp = path + ".meta"
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            head = src.read(13)
            if head[:6] not in (b"GIF87a", b"GIF89a"):
                raise ValueError(f"{path} is not a GIF file")
            packed = head[10]
            table = 3 * (2 << (packed & 0x07)) if packed & 0x80 else 0
            dst.write(b"GIF89a" + head[6:] + src.read(table))  # comments need GIF89a
            dst.write(gif_comment_blocks(metadata))
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_gif_comments(path: str) -> dict[str, str]:
    """Comment extensions anywhere in the file, as {key: value}; a small parser because PIL keeps only one."""
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 13
    if data[10] & 0x80:
        pos += 3 * (2 << (data[10] & 0x07))
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:
            label = data[pos + 1]
            pos += 2
            payload = bytearray()
            while data[pos]:
                payload += data[pos + 1 : pos + 1 + data[pos]]
                pos += 1 + data[pos]
            pos += 1
            if label == 0xFE:
                key, _, value = payload.decode("latin-1").partition(":")
                out[key] = value
        elif block == 0x2C:  # image descriptor (+ local table), then LZW data sub-blocks
            packed = data[pos + 9]
            pos += 10 + (3 * (2 << (packed & 0x07)) if packed & 0x80 else 0) + 1
            while data[pos]:
                pos += 1 + data[pos]
            pos += 1
        else:
            break
    return out


# --- reading back ------------------------------------------------------------------------------------------


def read_metadata(path: str) -> dict[str, str]:
    """Tags written by this package, whatever the format; WebM's upper-cased names are lower-cased back."""
    if os.path.isdir(path):
        first = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
        if not first:
            return {}
        path = os.path.join(path, first[0])
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}))
    if ext == ".webp":
        return read_webp_exif(path)
    if ext == ".gif":
        return read_gif_comments(path)
    import av

    with av.open(path) as container:
        tags = dict(container.metadata)
    if ext in (".webm", ".mkv"):
        tags = {k.lower(): v for k, v in tags.items()}
    return tags
