"""Generate the Python gRPC code for protos/truepolicy/v1/*.proto into truepolicy/v1/.

Reproducible: grpcio-tools is pinned (requirements/constraints.txt). `--check` regenerates into a
temporary directory and fails if the committed files differ (tests/test_protos.py runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("truepolicy") / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_root / PACKAGE).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    opts = parser.parse_args()
    if not opts.check:
        for path in generate(ROOT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            p.name for p in fresh if not filecmp.cmp(p, ROOT / PACKAGE / p.name, shallow=False)
        ] if all((ROOT / PACKAGE / p.name).exists() for p in fresh) else ["<missing files>"]  # fmt: skip
    if stale:
        print(f"stale generated code: {stale}; run python scripts/gen_protos.py", file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
