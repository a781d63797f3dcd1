"""The committed stubs must be exactly what ``python -m protos.generate`` produces."""

from pathlib import Path

from protos.generate import PROTO_DIR, generate


def test_generated_stubs_are_fresh(tmp_path: Path):
    generated = generate(tmp_path)
    assert {p.name for p in generated} == {"coordinator_pb2.py", "coordinator_pb2.pyi", "coordinator_pb2_grpc.py"}
    for path in generated:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{committed.name} is not committed; run python -m protos.generate"
        assert committed.read_text() == path.read_text(), (
            f"protos/{path.name} is stale; run `python -m protos.generate` and commit the result")


def test_every_rpc_and_field_is_commented():
    text = (PROTO_DIR / "coordinator.proto").read_text().splitlines()
    for i, line in enumerate(text):
        stripped = line.strip()
        is_member = stripped.startswith("rpc ") or (stripped.endswith(";") and "=" in stripped
                                                      and not stripped.startswith(("syntax", "option")))
        if is_member:
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
