"""Resolving a record's image path inside the image root, and checking that the file is an image.

A dataset file is input we did not write: its image paths must never reach outside the image root
(``..`` components, absolute paths, symlinks that resolve elsewhere). Those are refused always.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .records import IMAGE_MISSING, IMAGE_OUTSIDE_ROOT, IMAGE_UNREADABLE, RecordProblem

_DRIVE = re.compile(r"^[A-Za-z]:")


class ImageRoot:
    """The folder that image paths are relative to; resolves them without leaving it.

    Resolved folders are cached (a 665k-record file has a few hundred), so a path costs one
    ``lstat`` of its file (is it a symlink?) rather than one per path component.
    """

    def __init__(self, root: str | Path):
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self._dirs: dict[str, str] = {}

    def resolve(self, rel: str) -> str:
        """The file for ``rel`` (a path under the root); raises ``image_outside_root`` otherwise."""
        if rel.startswith(("/", "\\")) or _DRIVE.match(rel):
            raise RecordProblem(
                IMAGE_OUTSIDE_ROOT, f"image path {rel!r} is absolute; it must be relative to the image root"
            )
        if ".." in rel.replace("\\", "/").split("/"):
            raise RecordProblem(
                IMAGE_OUTSIDE_ROOT, f"image path {rel!r} contains '..'; it must stay inside the image root"
            )
        folder, _, name = rel.rpartition("/")
        real_folder = self._dirs.get(folder)
        if real_folder is None:
            real_folder = os.path.realpath(os.path.join(self.root, folder))
            self._check_inside(rel, real_folder)
            self._dirs[folder] = real_folder
        path = os.path.join(real_folder, name)
        if os.path.islink(path):
            self._check_inside(rel, os.path.realpath(path))
        return path

    def _check_inside(self, rel: str, real: str) -> None:
        if real != self.root and not real.startswith(self._prefix):
            raise RecordProblem(
                IMAGE_OUTSIDE_ROOT,
                f"image path {rel!r} resolves to {real!r}, outside the image root {self.root!r}",
            )


def check_image(path: str, rel: str, verify: bool = True) -> None:
    """Raise :class:`RecordProblem` if the file is missing or (with ``verify``) not a readable image.

    ``verify`` opens the file with Pillow and runs ``Image.verify()``: it reads the header and
    checks the data's structure without decoding every pixel.
    """
    if not os.path.isfile(path):
        raise RecordProblem(IMAGE_MISSING, f"image file {rel!r} not found under the image root")
    if not verify:
        return
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordProblem(
            IMAGE_UNREADABLE, f"image file {rel!r} is not a readable image ({exc})"
        ) from exc
