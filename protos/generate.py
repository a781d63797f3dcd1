"""Regenerate the committed protobuf/gRPC stubs from ``protos/*.proto``.

Run from anywhere: ``python -m protos.generate``. The stubs are written next to the .proto files
and import each other as ``from protos import coordinator_pb2`` with no rewriting, because protoc
runs with the repository root as its include path. ``tests/unit/test_protos.py`` regenerates into
a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto file, writing ``protos/*_pb2*.py(i)`` under ``out_root``."""
    from grpc_tools import protoc  # development-only dependency

    protos = sorted(p.relative_to(REPO_ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{REPO_ROOT}", f"--python_out={out_root}", f"--grpc_python_out={out_root}",
            f"--pyi_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return sorted((out_root / "protos").glob("*_pb2*"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(f"wrote protos/{path.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
