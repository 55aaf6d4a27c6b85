"""``progress-service hooks install|uninstall``: the Claude Code settings that report a session.

``install`` adds one ``http`` hook per reported event to a project's
``.claude/settings.json`` (``--project DIR``) or the user's
``~/.claude/settings.json`` (``--user``), next to whatever hooks are there;
``--print`` prints the block instead. The token is never written: the hook's
``Authorization`` header reads ``$PS_HOOK_TOKEN`` from the CLI's environment
(``allowedEnvVars``). ``uninstall`` removes exactly the hooks ``install``
adds (an ``http`` hook whose URL ends in the hooks path) and the groups and
events that only held them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from progress_service.settings import Settings

HOOKS_PATH = "/api/hooks/claude-code"
TOKEN_ENV = "PS_HOOK_TOKEN"
#: Events that show in the room (see ``progress_service.hooks.mapping``).
EVENTS = (
    "SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "PostToolUseFailure",
    "SubagentStart", "SubagentStop", "TaskCreated", "TaskCompleted", "Notification",
    "PreCompact", "PostCompact", "Stop", "StopFailure", "SessionEnd",
)
#: Seconds the CLI waits for an answer before going on (the service answers in milliseconds).
TIMEOUT = 5
DEFAULT_URL = "http://127.0.0.1:8000"


def hook_entry(base_url: str, host: str) -> dict[str, Any]:
    """The ``http`` hook that posts one event to the service."""
    return {
        "type": "http",
        "url": base_url.rstrip("/") + HOOKS_PATH,
        "timeout": TIMEOUT,
        "headers": {"Authorization": f"Bearer ${TOKEN_ENV}", "X-PS-Host": host},
        "allowedEnvVars": [TOKEN_ENV],
    }


def is_ours(hook: Any) -> bool:
    """True for a hook ``install`` wrote (whatever URL it was given)."""
    return (
        isinstance(hook, dict)
        and hook.get("type") == "http"
        and isinstance(hook.get("url"), str)
        and hook["url"].rstrip("/").endswith(HOOKS_PATH)
    )


def merge(settings: dict[str, Any], base_url: str, host: str) -> dict[str, Any]:
    """``settings`` with our hooks added (an earlier install's replaced); other keys and hooks untouched."""
    result = unmerge(settings)
    hooks = result.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise ValueError("the settings' 'hooks' is not an object; fix the file first")
    for event in EVENTS:
        groups = hooks.setdefault(event, [])
        if not isinstance(groups, list):
            raise ValueError(f"the settings' hooks.{event} is not a list; fix the file first")
        groups.append({"hooks": [hook_entry(base_url, host)]})
    return result


def unmerge(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without our hooks, and without the groups, events and ``hooks`` key only they filled."""
    result: dict[str, Any] = json.loads(json.dumps(settings))  # a deep copy that stays plain JSON
    hooks = result.get("hooks")
    if not isinstance(hooks, dict):
        return result
    for event in list(hooks):
        groups = hooks[event]
        if not isinstance(groups, list):
            continue
        kept = []
        for group in groups:
            inner = group.get("hooks") if isinstance(group, dict) else None
            if isinstance(inner, list) and any(is_ours(h) for h in inner):
                group = {**group, "hooks": [h for h in inner if not is_ours(h)]}
                if not group["hooks"]:
                    continue
            kept.append(group)
        if kept:
            hooks[event] = kept
        else:
            del hooks[event]
    if not hooks:
        del result["hooks"]
    return result


def settings_path(args: argparse.Namespace) -> Path:
    """The settings file ``--project DIR`` or ``--user`` names."""
    if args.user:
        return Path(os.environ.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude") / "settings.json"
    return Path(args.project or ".").resolve() / ".claude" / "settings.json"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def _write(path: Path, settings: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written settings file


def cmd_install(args: argparse.Namespace, settings: Settings) -> int:
    """Add the reporting hooks to a settings file (or print them)."""
    base_url = args.url or settings.public_url or DEFAULT_URL
    host = args.host_label or socket.gethostname()
    if args.print:
        print(json.dumps(merge({}, base_url, host), indent=2))
        return 0
    path = settings_path(args)
    try:
        merged = merge(_read(path), base_url, host)
    except (ValueError, OSError) as exc:
        print(f"progress-service: cannot install hooks in {path}: {exc}", file=sys.stderr)
        return 2
    _write(path, merged)
    print(f"progress-service: {len(EVENTS)} hooks -> {base_url.rstrip('/')}{HOOKS_PATH} written to {path}")
    print(f"progress-service: set {TOKEN_ENV} to a reporter token where Claude Code runs "
          f"(progress-service token create --role reporter ...); the file never holds it")
    return 0


def cmd_uninstall(args: argparse.Namespace, settings: Settings) -> int:
    """Remove exactly the hooks ``install`` added."""
    path = settings_path(args)
    try:
        current = _read(path)
    except (ValueError, OSError) as exc:
        print(f"progress-service: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if not current and not path.exists():
        print(f"progress-service: {path} does not exist; nothing to remove")
        return 0
    cleaned = unmerge(current)
    if cleaned == current:
        print(f"progress-service: no progress-service hooks in {path}")
        return 0
    if cleaned:
        _write(path, cleaned)
    else:
        path.unlink()  # it held nothing but our hooks
    print(f"progress-service: hooks removed from {path}")
    return 0


def register(sub: Any, **_: Any) -> None:
    """Add ``hooks install`` and ``hooks uninstall`` to the command."""
    hooks = sub.add_parser("hooks", help="report Claude Code sessions run elsewhere (HTTP hooks)")
    hsub = hooks.add_subparsers(dest="hooks_command", required=True, metavar="ACTION")
    for name, func, text in (
        ("install", cmd_install, "add the reporting hooks to Claude Code's settings"),
        ("uninstall", cmd_uninstall, "remove the hooks install added"),
    ):
        p = hsub.add_parser(name, help=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--project", metavar="DIR", default=None, help="the project's .claude/settings.json (default: .)")
        where.add_argument("--user", action="store_true", help="your ~/.claude/settings.json (every project)")
        if name == "install":
            p.add_argument("--print", action="store_true", help="print the settings block instead of writing it")
            p.add_argument("--url", default=None, help=f"the service's base URL (default: $PS_PUBLIC_URL, else {DEFAULT_URL})")
            p.add_argument("--host-label", default=None, help="how the job list names this machine (default: its hostname)")
        p.set_defaults(func=func)
