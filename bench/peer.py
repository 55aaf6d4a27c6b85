"""The seed's Node ``ws`` server as a benchmark peer, run from where it lives.

The peer's code stays in ``../shared/seed/peer/`` (read-only: nothing is
copied into the project and nothing is installed there). Its one dependency,
``ws`` (pinned in ``bench/node/package.json`` and its lock file), is installed
into ``bench/node/node_modules``. The server runs from a temp dir holding two
symlinks, ``server.mjs`` -> the seed's file and ``node_modules`` -> ours, with
``--preserve-symlinks-main`` so Node resolves ``ws`` from the temp dir and not
from the seed's folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.orchestra import log
from bench.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "node"
#: Where the seed's peer is looked for when ``--seed-dir`` is not given (the
#: session's layout: ``<root>/shared`` beside the checkout or its parent).
SEED_CANDIDATES = (
    ROOT.parent / "shared" / "seed" / "peer",
    ROOT.parent.parent / "shared" / "seed" / "peer",
)
#: The seed's fixed credential (its server checks nothing else).
SEED_TOKEN = "dev-token"


class PeerUnavailable(Exception):
    """Node.js, npm or the seed's folder is missing; the comparison is skipped with this reason."""


def _origin_candidates() -> list[Path]:
    """``shared/seed/peer`` beside the local repository this checkout was cloned from, if it was.

    A clone made elsewhere (``git clone /work/main /tmp/x``) is not beside
    ``shared/``, but the repository it came from is.
    """
    try:
        url = subprocess.run(
            ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    url = url.removeprefix("file://")
    if not url or "://" in url or not url.startswith("/"):
        return []  # not a local path (a remote URL, or none)
    origin = Path(url)
    return [origin.parent / "shared" / "seed" / "peer", origin.parent.parent / "shared" / "seed" / "peer"]


def find_seed_dir(explicit: str | None = None) -> Path:
    """The folder holding the seed's ``server.mjs``; raises :class:`PeerUnavailable`."""
    candidates = [Path(explicit)] if explicit else [*SEED_CANDIDATES, *_origin_candidates()]
    if not explicit and os.environ.get("SEED_PEER_DIR"):
        candidates.insert(0, Path(os.environ["SEED_PEER_DIR"]))
    for c in candidates:
        if (c / "server.mjs").is_file():
            return c.resolve()
    raise PeerUnavailable(f"the seed's peer (server.mjs) is not in {', '.join(str(c) for c in candidates)}")


def node_binary() -> str:
    """The ``node`` executable; raises :class:`PeerUnavailable`."""
    node = shutil.which("node")
    if node is None:
        raise PeerUnavailable("Node.js (node) is not on PATH")
    return node


def ensure_node_modules(timeout: float = 240.0) -> Path:
    """``bench/node/node_modules`` with the pinned ``ws``, installed (``npm ci``) if missing."""
    modules = NODE_DIR / "node_modules"
    if (modules / "ws" / "package.json").is_file():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise PeerUnavailable("npm is not on PATH (needed once to install ws into bench/node)")
    log("installing the peer's ws into bench/node (npm ci)")
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not (modules / "ws" / "package.json").is_file():
        raise PeerUnavailable(f"npm ci in bench/node failed: {(proc.stderr or proc.stdout)[-500:]}")
    return modules


class SeedPeer(ServerProcess):
    """The seed's server on a free port, optionally pinned to ``cpus``. Use as a context manager."""

    def __init__(self, seed_dir: Path, *, cpus: set[int] | None = None) -> None:
        super().__init__(cpus=cpus)
        self.seed_dir = seed_dir
        self.tmp = Path(tempfile.mkdtemp(prefix="ps-bench-seed-"))
        self.log_path = self.tmp / "server.log"

    def __enter__(self) -> SeedPeer:
        try:
            modules = ensure_node_modules()
            (self.tmp / "server.mjs").symlink_to(self.seed_dir / "server.mjs")
            (self.tmp / "node_modules").symlink_to(modules)
            cmd = [node_binary(), "--preserve-symlinks", "--preserve-symlinks-main", str(self.tmp / "server.mjs")]
            # Its stdout is the audit log it prints per comment: a file, as in production.
            with self.log_path.open("ab") as out:
                self.spawn("seed peer", cmd, env={**os.environ, "PORT": str(self.port)}, cwd=self.tmp, output=out,
                           timeout=20)
        except BaseException:
            self.__exit__(None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
