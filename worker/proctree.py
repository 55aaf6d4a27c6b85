"""Finding and ending every process one CLI run started, including escaped ones.

A process group is not enough: the Claude Code Bash tool starts its shell in
a new session (``setsid``), and a double-forked daemon leaves the tree of the
CLI altogether. Two things make such processes findable again:

- the worker makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``),
  so an orphan is re-parented to the worker instead of to PID 1 and stays a
  descendant of the worker process;
- every CLI is started with ``PS_JOB_TAG=<unique tag>`` in its environment,
  which its descendants inherit, so the worker can tell which job a
  re-parented orphan belongs to (several jobs run in one worker).

A run's processes are the CLI's process group, the CLI's descendants, and
every descendant of the worker whose environment carries the run's tag.
Orphans re-parented to the worker must also be reaped by it (nobody else
waits for them): :meth:`ProcessTree.reap` does that for the pids it has seen.
A cgroup per job would be stronger still (it also catches a process that
cleared its environment after daemonizing) but needs a writable cgroup v2
hierarchy, which containers usually lack.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
from typing import NamedTuple

log = logging.getLogger("progress_service.worker")

#: The environment variable that marks every process of one run.
TAG_VAR = "PS_JOB_TAG"
_PR_SET_CHILD_SUBREAPER = 36
_subreaper: bool | None = None


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (once; Linux only).

    Returns whether it is one. Without it, escaped processes are still found
    by their tag when ``/proc`` shows them, but they are re-parented to PID 1.
    """
    global _subreaper
    if _subreaper is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper = False
        if not _subreaper:
            log.warning("could not become a child subreaper: escaped CLI processes are found by tag only")
    return _subreaper


class Proc(NamedTuple):
    """One line of ``/proc/<pid>/stat`` that matters here."""

    pid: int
    state: bytes
    ppid: int
    pgrp: int

    @property
    def alive(self) -> bool:
        """False for zombies (exited, not yet reaped): gone for every purpose here."""
        return self.state not in (b"Z", b"X")


def processes() -> dict[int, Proc]:
    """Every process ``/proc`` shows, by pid (empty where there is no ``/proc``)."""
    found: dict[int, Proc] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." - comm may contain spaces and parens.
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) >= 3:
            pid = int(entry)
            found[pid] = Proc(pid, rest[0], int(rest[1]), int(rest[2]))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    if not os.path.isdir("/proc"):  # not Linux: fall back to "is anyone there"
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    return [p.pid for p in processes().values() if p.pgrp == pgid and p.alive]


def descendants(procs: dict[int, Proc], root: int) -> set[int]:
    """Pids below ``root`` in the parent tree (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _has_tag(pid: int, marker: bytes) -> bool:
    """True when ``marker`` (``\\0NAME=value\\0``) is one of the process's variables."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read()
    except OSError:
        return False
    # The first variable has no NUL before it.
    return marker in env or env.startswith(marker[1:])


class ProcessTree:
    """The processes of one CLI run: ``leader``'s group and tree, and its tagged escapees."""

    def __init__(self, leader: int, tag: str) -> None:
        self.leader = leader
        self.tag = tag
        self._marker = b"\0" + f"{TAG_VAR}={tag}".encode() + b"\0"
        #: Every pid ever seen in this run (to reap the orphans among them).
        self.seen: set[int] = set()

    def members(self) -> list[int]:
        """The run's live processes now (the leader included while it lives)."""
        procs = processes()
        me = os.getpid()
        found = {p.pid for p in procs.values() if p.pgrp == self.leader}
        found |= descendants(procs, self.leader)
        if self.leader in procs:
            found.add(self.leader)
        # Escapees: re-parented to us (subreaper), or to PID 1 without it.
        scope = descendants(procs, me) if _subreaper else set(procs)
        for pid in scope - found:
            if _has_tag(pid, self._marker):
                found.add(pid)
        found.discard(me)
        self.seen |= found
        return [pid for pid in found if procs.get(pid) is None or procs[pid].alive]

    def send(self, sig: signal.Signals, *, group_only: bool = False) -> None:
        """Send ``sig`` to the leader's group and (unless ``group_only``) to every member."""
        try:
            os.killpg(self.leader, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if group_only:
            return
        for pid in self.members():
            if pid == self.leader:
                continue  # the leader was signalled with its group
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self) -> None:
        """Collect the exit status of orphans re-parented to this process.

        Only pids seen as members of this run, and never the leader (its
        ``Process`` object waits for it): another child of this process is
        someone else's to wait for.
        """
        me = os.getpid()
        procs = processes()
        for pid in self.seen - {self.leader}:
            p = procs.get(pid)
            if p is not None and p.ppid == me and not p.alive:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
