"""Images a client sends, contained: data only, or a file under the operator's data folder, bounded.

Everything here is plain Python (PIL, no torch, no Ray) so the HTTP front checks a job's image at the
door and a worker decodes it under the same limits. A client names no server path unless the operator
started the server with a data folder; then a name is resolved (symlinks included) and must stay
inside it, be a regular file, and fit the byte limit. Every failure of a name gives the same message,
so a client cannot tell whether something outside the folder exists.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from .jobs import JobError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # the decoders a client may reach; PIL knows dozens more
DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,", re.IGNORECASE)
NOT_UNDER_DATA_DIR = "no image file of that name under the server's data folder"


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server. Defaults suit a 576x1024 conditioning image with room."""

    max_body_bytes: int = 16 * 2**20  # one request body (base64 inflates an image by 4/3)
    max_image_bytes: int = 10 * 2**20  # one encoded image (PNG/JPEG/WEBP file)
    max_pixels: int = 4096 * 4096  # decoded width x height: decompression bombs stop here
    max_side: int = 8192
    read_timeout_s: float = 10.0  # reading a body or a data-folder file


class InputError(JobError):
    """A request field the server refuses; ``field`` names it (HTTP 422, one entry per field)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def decode_base64_image(text: str, limits: Limits, field: str = "image") -> bytes:
    """A data URL (image/png|jpeg|webp) or bare base64 -> bytes, the size checked before decoding."""
    match = DATA_URL.match(text)
    if match:
        text = text[match.end():]
    elif text.startswith("data:"):
        raise InputError(field, "a data URL must be data:image/png|jpeg|webp;base64,...")
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4:
        raise InputError(field, f"the image is larger than the limit of {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(field, "not base64 image data (send PNG, JPEG or WEBP bytes as base64 or a data URL; "
                                "server file names go in 'image_path')") from None


def image_size(data: bytes, limits: Limits, field: str = "image") -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes, read from the header only; refuses formats other
    than PNG/JPEG/WEBP, sizes beyond the limits and files PIL finds broken."""
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise InputError(field, f"the image is larger than the limit of {limits.max_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                fmt, (w, h) = img.format, img.size
                _check_pixels(w, h, limits, field)
                img.verify()  # chunk structure and checksums, without decoding pixels
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(field, f"the image has more than {limits.max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad data; none is the client's business
        raise InputError(field, "not a readable PNG, JPEG or WEBP image") from None
    return fmt, w, h


def _check_pixels(w: int, h: int, limits: Limits, field: str) -> None:
    if w < 1 or h < 1 or w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise InputError(field, f"the image is {w}x{h}; the server takes at most {limits.max_pixels} pixels and "
                                f"{limits.max_side} per side")


def load_image(data: bytes, limits: Limits | None = None):
    """Decode checked image bytes to RGB (a worker's side): the same formats and limits, pixels bounded
    before they are decoded."""
    from PIL import Image

    limits = limits or Limits()
    image_size(data, limits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        _check_pixels(*img.size, limits, "image")
        return img.convert("RGB")


class DataDir:
    """The operator's folder of server-side images. ``read(name)`` returns a file's bytes, or refuses
    with one message for every name that is not a regular file inside the folder."""

    def __init__(self, root: str | os.PathLike):
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise JobError(f"data folder {root} is not a folder")
        self.root = real

    def __repr__(self) -> str:
        return f"DataDir({self.root!r})"

    def _inside(self, path: str) -> bool:
        return path != self.root and os.path.commonpath([self.root, path]) == self.root

    def read(self, name: str, limits: Limits, field: str = "image_path") -> bytes:
        refused = InputError(field, NOT_UNDER_DATA_DIR)
        if not isinstance(name, str) or not name or "\x00" in name or len(name) > 1024:
            raise refused
        lexical = os.path.normpath(os.path.join(self.root, name))
        if not self._inside(lexical):  # '..' or an absolute path elsewhere: refused before touching the disk
            raise refused
        target = os.path.realpath(lexical)  # symlinks resolved: they must land inside too
        if not self._inside(target):
            raise refused
        try:
            st = os.stat(target)
        except OSError:
            raise refused from None
        if not stat.S_ISREG(st.st_mode):  # FIFOs, devices, sockets, folders: never opened
            raise refused
        if st.st_size > limits.max_image_bytes:
            raise InputError(field, f"the file is larger than the limit of {limits.max_image_bytes} bytes")
        return _read_bounded(target, st, limits, field, refused, inside=self._inside)


def _read_bounded(target: str, st: os.stat_result, limits: Limits, field: str, refused: InputError,
                  inside=None) -> bytes:
    """Open without blocking or following a last symlink, check it is the file stat'ed (and, with
    ``inside``, still inside the folder), read at most the limit."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError:
        raise refused from None
    try:
        opened = os.fstat(fd)  # the file opened is the file checked (not swapped since the stat)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise refused
        proc = Path(f"/proc/self/fd/{fd}")
        if inside is not None and proc.parent.is_dir() and not inside(os.path.realpath(proc)):
            raise refused  # a folder on the way was swapped for a link meanwhile
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limits.max_image_bytes:
                raise InputError(field, f"the file is larger than the limit of {limits.max_image_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        raise refused from None
    finally:
        os.close(fd)


def read_regular_file(path: str | os.PathLike, limits: Limits, field: str = "image") -> bytes:
    """An operator-named file (batch job files): a regular file only (a FIFO is never opened), bounded."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except OSError as err:
        raise InputError(field, f"cannot read {str(path)[:200]!r} ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(field, f"{str(path)[:200]!r} is not a regular file")
    return _read_bounded(target, st, limits, field, InputError(field, f"cannot read {str(path)[:200]!r}"))
