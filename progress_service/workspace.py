"""Confining job working directories to the workspace root."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class WorkdirError(ValueError):
    """A workdir that is absolute, escapes the root, or does not exist."""


def resolve_workdir(root: Path, workdir: str | None) -> Path:
    """The absolute directory a job runs in, guaranteed inside ``root``.

    ``workdir`` is relative to ``root``; absolute paths, ``..`` segments and
    symlinks that lead out of the root are refused.
    """
    root = root.resolve()
    if not workdir or workdir in (".", "./"):
        return root
    if "\x00" in workdir:
        raise WorkdirError("workdir: must not contain NUL characters")
    rel = PurePosixPath(workdir)
    if rel.is_absolute() or workdir.startswith("~"):
        raise WorkdirError("workdir: must be relative to the workspace root")
    if ".." in rel.parts:
        raise WorkdirError("workdir: must not contain '..'")
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise WorkdirError("workdir: resolves outside the workspace root (symlink?)")
    if not target.is_dir():
        raise WorkdirError(f"workdir: {workdir!r} is not a directory in the workspace")
    return target
