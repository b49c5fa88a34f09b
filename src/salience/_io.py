"""Reading images safely, writing outputs atomically, and a small progress bar.

Used by the command line and the report; nothing here imports matplotlib or torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "Progress",
    "atomic_write",
    "load_image",
    "save_npy",
    "save_png",
]

DEFAULT_MAX_PIXELS = 89_478_485
"""Largest image (width × height) read by default: Pillow's decompression-bomb threshold."""


class ImageError(ValueError):
    """An input image could not be used; the message names the file and the problem."""


@contextlib.contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Let Pillow open any size: :func:`load_image` checks the size itself, before decoding."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Read an image file as 8-bit RGB, or raise :class:`ImageError` naming the file.

    Grayscale, palette, RGBA (composited over white), CMYK and 16-bit images are converted to
    RGB; the EXIF orientation is applied. The size is checked from the header before any pixel
    is decoded, so a decompression bomb costs nothing.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels than this (``None``: no limit). The default
            is Pillow's decompression-bomb threshold, about 89 megapixels.

    Returns:
        The decoded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageError: The file is missing, a directory, not an image, truncated or corrupt, or
            too large.
    """
    from salience.models import to_rgb

    name = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{name}: no such file")
    if p.is_dir():
        raise ImageError(f"{name}: is a directory, not an image")
    try:
        with _pillow_limit_off(), Image.open(p) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{name}: image is {width}×{height} = {width * height:,} pixels, over the "
                    f"limit of {max_pixels:,} (decompression-bomb guard); raise the limit "
                    "(CLI: --max-pixels) only for files you trust"
                )
            opened.load()  # decode now: a truncated or corrupt file fails here
            oriented = ImageOps.exif_transpose(opened) or opened
            rgb = to_rgb(oriented)
            return rgb.copy() if rgb is opened else rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - the limit is checked above
        raise ImageError(f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = str(exc) or type(exc).__name__
        if "truncated" in detail.lower():
            raise ImageError(f"{name}: truncated image file ({detail})") from None
        raise ImageError(f"{name}: corrupt or unreadable image ({detail})") from None


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers never see a partial file.

    The bytes go to a temporary file in the same directory, which is flushed, synced and then
    renamed over ``path`` with :func:`os.replace` (atomic on POSIX and Windows). If anything
    fails, or the process is interrupted, ``path`` is untouched and the temporary file removed.

    Returns:
        The path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save a PIL image as PNG, atomically (see :func:`atomic_write`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return atomic_write(path, buffer.getvalue())


def save_npy(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save an array in ``.npy`` format, atomically (see :func:`atomic_write`)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return atomic_write(path, buffer.getvalue())


class Progress:
    """A minimal progress bar on stderr: ``label [#####-----] 3/10 0:04<0:06``.

    Drawn only when ``enabled`` (by default: when the stream is a terminal), redrawn at most
    ten times a second, and erased when the work is done.

    Args:
        total: Number of steps.
        label: Text in front of the bar.
        enabled: Draw at all; ``None`` draws only on a terminal.
        stream: Where to draw (``sys.stderr``).
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, steps: int = 1, label: str | None = None) -> None:
        """Advance by ``steps`` (and optionally change the label)."""
        self.done = min(self.total, self.done + steps) if self.total else self.done + steps
        if label is not None:
            self.label = label
        self._draw(force=self.done >= self.total)

    def set_label(self, label: str) -> None:
        """Change the text in front of the bar."""
        self.label = label
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        elapsed = now - self._start
        if self.total:
            frac = self.done / self.total
            filled = round(20 * frac)
            bar = "#" * filled + "-" * (20 - filled)
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            text = (
                f"{self.label} [{bar}] {self.done}/{self.total} "
                f"{_clock(elapsed)}<{_clock(eta) if self.done else '?'}"
            )
        else:
            text = f"{self.label} {self.done} {_clock(elapsed)}"
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
