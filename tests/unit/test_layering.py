"""The shared package ``hivefold/`` imports no role (DESIGN.md, Layering); the CLI alone wires the roles."""

import ast

from tests.conftest import REPO

ROLES = {"coordinator", "peer"}
WIRES_THE_ROLES = {"hivefold/cli.py"}


def role_imports(path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] in ROLES]


def test_the_shared_package_imports_no_role():
    found = {str(p.relative_to(REPO)): role_imports(p) for p in sorted((REPO / "hivefold").rglob("*.py"))
             if str(p.relative_to(REPO)) not in WIRES_THE_ROLES}
    assert {k: v for k, v in found.items() if v} == {}
