"""Confining job working directories to the workspace root."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from progress_service.errors import WorkdirError


def resolve_workdir(root: Path, workdir: str | None) -> Path:
    """The absolute directory a job runs in, guaranteed inside ``root``.

    ``workdir`` is relative to ``root``; absolute paths, ``..`` segments and
    symlinks that lead out of the root are refused. The API checks it at
    submission and the worker again before it starts the CLI, since the tree
    may have changed in between.
    """
    root = root.resolve()
    if not workdir or workdir in (".", "./"):
        return root
    if "\x00" in workdir:
        raise WorkdirError("workdir: must not contain NUL characters")
    rel = PurePosixPath(workdir)
    outside = WorkdirError(f"workdir: {workdir!r} is outside the workspace root")
    if rel.is_absolute() or workdir.startswith("~") or ".." in rel.parts:
        raise outside
    # Symlinks are resolved before the check, so a link out is refused.
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise outside
    if not target.is_dir():
        raise WorkdirError(f"workdir: {workdir!r} is not a directory in the workspace")
    return target
