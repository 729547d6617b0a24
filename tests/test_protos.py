"""The versioned protos: generated code is current, every element documented, enums start at 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos" / "truepolicy" / "v1").glob("*.proto"))
# A declaration that must carry a comment on the line(s) right above it.
DECLARATION = re.compile(r"^\s*(rpc \w+|(optional |repeated )?[\w.]+ \w+ = \d+;|\w+ = \d+;|service \w+)")


def test_generated_protobuf_code_is_current():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_proto_is_versioned_and_documented(proto):
    lines = proto.read_text().splitlines()
    assert "package truepolicy.v1;" in lines
    undocumented = []
    for i, line in enumerate(lines):
        if DECLARATION.match(line) and not lines[i - 1].strip().startswith("//"):
            undocumented.append(f"{proto.name}:{i + 1}: {line.strip()}")
    enum_values = re.findall(r"enum (\w+) \{\s*(?://[^\n]*\n\s*)*(\w+) = (\d+);", proto.read_text())
    bad_enums = [e for e, first, num in enum_values if not (first.endswith("_UNSPECIFIED") and num == "0")]
    assert not bad_enums, f"enums must start with *_UNSPECIFIED = 0: {bad_enums}"
    assert enum_values or "enum " not in proto.read_text()
    assert not undocumented, "\n".join(undocumented)
