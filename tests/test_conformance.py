"""docs/conformance-statement.md is what ``python -m dimse_async.cli.conformance`` generates
from the code's tables: the test fails when a table changed and the document did not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom

from dimse_async.cli import conformance

ROOT = Path(__file__).resolve().parent.parent
_REGISTRY_ROW = re.compile(r"^\| .* \| `[\d.]+` \|$")


def _without_registry(text: str) -> list[str]:
    """The document minus what pydicom's UID registry decides (names, class lists)."""
    return [
        line
        for line in text.splitlines()
        if not _REGISTRY_ROW.match(line) and "pydicom" not in line and not re.search(r"\b\d{3}\b", line)
    ]


def test_conformance_statement_is_up_to_date() -> None:
    current = conformance.DOC.read_text(encoding="utf-8")
    generated = conformance.render()
    recorded = re.search(r"pydicom (\S+)'s registry", current)
    assert recorded, "the statement records the pydicom version it was generated with"
    if recorded[1] == pydicom.__version__:
        assert current == generated, "stale: run python -m dimse_async.cli.conformance --write"
    else:  # another pydicom: its registry may name or list classes differently
        assert _without_registry(current) == _without_registry(generated), (
            "stale: run python -m dimse_async.cli.conformance --write"
        )


def test_check_option_detects_a_stale_document(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "dimse_async.cli.conformance", "--check"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if conformance.DOC.read_text(encoding="utf-8") == conformance.render():
        assert done.returncode == 0, done.stderr
    stale = tmp_path / "conformance-statement.md"
    stale.write_text(conformance.render().replace("Verification SOP Class", "Verification"), encoding="utf-8")
    monkeypatch.setattr(conformance, "DOC", stale)
    assert conformance.main(["--check"]) == 1
    assert conformance.main(["--write"]) == 0
    assert conformance.main(["--check"]) == 0


def test_statement_lists_what_the_servers_accept() -> None:
    text = conformance.render()
    for uid in (
        "1.2.840.10008.1.1",
        "1.2.840.10008.5.1.4.1.2.2.1",
        "1.2.840.10008.5.1.4.31",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.20.1",  # storage commitment
        "1.2.840.10008.3.1.2.3.3",  # MPPS
        "1.2.840.10008.5.1.4.33",  # instance availability notification
    ):
        assert f"`{uid}`" in text, uid
    roles = [line for line in text.splitlines() if line.startswith("| ") and " | N-" in line]
    assert any("`1.2.840.10008.1.20.1` | N-ACTION | SCP" in line for line in roles), roles
    assert any("`1.2.840.10008.1.20.1` | N-EVENT-REPORT | SCU" in line for line in roles), roles
    assert any("`1.2.840.10008.3.1.2.3.3` | N-CREATE | SCP" in line for line in roles), roles
    assert any("`1.2.840.10008.3.1.2.3.3` | N-SET | SCP" in line for line in roles), roles
    assert any("`1.2.840.10008.5.1.4.33` | N-CREATE | SCU" in line for line in roles), roles
    assert "| 0x0112 | no such object instance |" in text
    for heading in ("## 1 Conformance Statement Overview", "## 4 Networking", "### 4.2 AE specifications",
                    "#### 4.2.2 Association policies", "#### 4.2.6 Normalized services: storage commitment, MPPS, "
                    "instance availability", "## 6 Support of character sets", "## 7 Security"):  # fmt: skip
        assert heading in text
