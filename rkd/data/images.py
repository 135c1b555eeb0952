"""Image files: size from the header, pixels as 8-bit RGB, image lookup by id.

Any PIL mode is converted to 8-bit RGB: alpha is dropped (UCAS-AOD PNGs are
RGBA with an opaque alpha), greyscale is replicated, and 16/32-bit integer or
float images are scaled linearly so that the image's maximum becomes 255
(sensors often store 10-12 bit data in 16-bit files, where a fixed /257 would
leave a nearly black image). EXIF orientation is ignored on purpose: label
coordinates refer to the stored pixel grid.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported by read_image only: rkd predict reads images without it
    from torch import Tensor

from rkd.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file, read from its header without decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image header: {e}") from e
    return h, w


def to_rgb8(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 array of any PIL image (see module doc for the rules).

    >>> a = to_rgb8(Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)))
    >>> a[..., 0].tolist()
    [[0, 64], [128, 255]]
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(im).astype(np.float64)
        peak = max(float(values.max(initial=0.0)), 255.0)
        gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    """Pixels of an image file as a writable ``(H, W, 3)`` uint8 RGB array."""
    try:
        with Image.open(path) as im:
            return np.array(to_rgb8(im), copy=True)  # PIL arrays are read-only
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from e


def read_image(path: Path) -> Tensor:
    """Pixels of an image file as a ``(3, H, W)`` uint8 RGB tensor."""
    import torch

    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1).contiguous()


def find_images(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by id (file stem), in sorted order.

    Two images with the same stem (``a.png`` and ``a.jpg``) are ambiguous for
    labels named by stem, so they are an error.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"{path}: two images with id {path.stem!r} ({found[path.stem].name} and {path.name})")
        found[path.stem] = path
    return found


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DataError naming it."""
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def decoded_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of the fully decoded pixels of ``path``: a file whose header reads but whose pixels do
    not (truncated, corrupt) raises :class:`DataError`. A file that decoded once is not decoded again:
    its size is kept under rkd's cache folder by the hash of its bytes, so a search re-validates its
    images at the cost of reading them."""
    from rkd.atomic import atomic_write_text
    from rkd.storage import cache_root

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    record = cache_root() / "decoded" / digest[:2] / digest
    if record.is_file():
        h, w = record.read_text().split()
        return int(h), int(w)
    h, w = read_image(path).shape[1:]
    atomic_write_text(record, f"{h} {w}\n")
    return int(h), int(w)


def pixel_problems(paths: list[Path]) -> list[str]:
    """One ``"path: why"`` line per image whose pixels cannot be decoded."""
    problems = []
    for path in dict.fromkeys(paths):
        try:
            decoded_size(path)
        except DataError as e:
            problems.append(str(e))
    return problems
