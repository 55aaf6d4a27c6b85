"""The README documents every setting, and docs/protocol.md every close code."""

from __future__ import annotations

from pathlib import Path

from progress_service import closes
from progress_service.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [PREFIX + f.upper() for f in Settings.__struct_fields__ if f"`{PREFIX}{f.upper()}`" not in readme]
    assert missing == []


def test_every_close_code_and_reason_is_in_the_protocol() -> None:
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    for close in closes.ALL:
        assert f"| {close.code} |" in protocol, close
        assert close.reason in protocol, close
