"""The seams between llmgate's packages, read from the code with `ast`: which package may import which,
and the contracts the processes share, each defined in one place (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import ROOT

PRODUCT = ("controller", "authsvc", "proxycore")
OURS = (*PRODUCT, "fakevllm")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    source = module_name(path)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(source, a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append(Import(source, child.module, child.lineno, in_function))
                # `from controller.model import scalars` imports controller.model.scalars
                found.extend(Import(source, f"{child.module}.{a.name}", child.lineno, in_function)
                             for a in child.names if (ROOT / Path(*child.module.split("."), f"{a.name}.py")).exists())
            visit(child, inside)

    visit(tree, False)
    return found


ALL_IMPORTS = [i for path in python_files(*OURS) for i in imports_of(path)]


def ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_import_walk_sees_imports():
    """The walk itself: it finds imports at the top and inside functions (so the tests below can fail)."""
    assert any(i.source == "proxycore.inference" and i.target == "controller.model.wire" for i in ALL_IMPORTS)
    assert any(i.in_function for i in ALL_IMPORTS)
    edges = {(i.source, i.target) for i in ALL_IMPORTS}
    assert ("authsvc.ui", "authsvc.admin") in edges


FORBIDDEN = [
    ("controller.model", lambda t: ours(t) and not within(t, "controller.model"),
     "the shared model imports nothing else of ours"),
    ("proxycore", lambda t: within(t, "authsvc"), "proxycore never imports authsvc"),
    ("authsvc", lambda t: within(t, "proxycore"), "authsvc never imports proxycore"),
    ("controller.edge", lambda t: within(t, "controller.ops"), "rendering and reloading nginx never start processes"),
    ("controller", lambda t: within(t, "fakevllm"), "the product never imports the fake backend"),
    ("authsvc", lambda t: within(t, "fakevllm"), "the product never imports the fake backend"),
    ("proxycore", lambda t: within(t, "fakevllm"), "the product never imports the fake backend"),
    ("proxycore", lambda t: t.split(".")[0] in ("psycopg", "sqlite3"), "proxycore never opens a database"),
]


@pytest.mark.parametrize("source, forbidden, rule", FORBIDDEN, ids=[r[2] + f" ({r[0]})" for r in FORBIDDEN])
def test_no_forbidden_import(source, forbidden, rule):
    bad = [f"{i.source}:{i.line} imports {i.target}" for i in ALL_IMPORTS
           if within(i.source, source) and forbidden(i.target)]
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_no_import_inside_a_function_crosses_packages():
    bad = [f"{i.source}:{i.line} imports {i.target} inside a function" for i in ALL_IMPORTS
           if i.in_function and ours(i.target) and i.target.split(".")[0] != i.source.split(".")[0]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for i in ALL_IMPORTS:
        if ours(i.target) and not i.in_function and i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
    state: dict[str, int] = {}
    cycles: list[str] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own module
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "\n".join(cycles)


# ---------------------------------------------------------------- one contract, one place

def definitions(kind: type, name: str) -> list[str]:
    found = []
    for path in python_files(*OURS):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind) and getattr(node, "name", None) == name:
                found.append(f"{module_name(path)}:{node.lineno}")
            if kind is ast.Assign and isinstance(node, ast.Assign):
                found += [f"{module_name(path)}:{node.lineno}" for t in node.targets
                          if isinstance(t, ast.Name) and t.id == name]
    return found


@pytest.mark.parametrize("kind, name, home", [
    (ast.FunctionDef, "key_hash", "controller.model.wire"),
    (ast.FunctionDef, "bearer_token", "controller.model.wire"),
    (ast.FunctionDef, "internal_key", "controller.model.gateway"),
    (ast.ClassDef, "UsageRecord", "controller.model.usage_record"),
    (ast.ClassDef, "FileWatch", "controller.ops.filewatch"),
    (ast.AsyncFunctionDef, "wait_for_stop", "controller.ops.serving"),
    (ast.Assign, "ERROR_TYPES", "controller.model.openai_errors"),
])
def test_each_contract_has_one_definition(kind, name, home):
    found = definitions(kind, name)
    assert len(found) == 1 and found[0].startswith(home + ":"), found


def product_text() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in python_files(*PRODUCT)}


@pytest.mark.parametrize("pattern, home, contract", [
    (r"""["']bearer ["']""", "controller.model.wire", "bearer parsing"),
    (r"\.encode\([\"']utf-8[\"'], [\"']surrogateescape[\"']\)", "controller.model.wire", "the key hash"),
    (r"LLMGATE_INTERNAL_KEY", "controller.model.gateway", "internal-key resolution"),
    (r"\bawatch\(", "controller.ops.filewatch", "the file watcher"),
    (r"add_signal_handler\(signal\.SIGTERM", "controller.ops.serving", "serve-until-signal"),
    (r"[\"']invalid_request_error[\"']|[\"']rate_limit_error[\"']", "controller.model.openai_errors",
     "the OpenAI error table"),
    (r"[\"']ttft_ms[\"']|[\"']retries[\"']", "controller.model.usage_record", "the usage record"),
])
def test_no_copy_of_a_contract_elsewhere(pattern, home, contract):
    where = [name for name, text in product_text().items() if re.search(pattern, text)]
    assert where == [home], f"{contract} is written outside {home}: {where}"


def test_one_class_per_name():
    names = Counter()
    where: dict[str, list[str]] = {}
    for path in python_files(*OURS) + sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names[node.name] += 1
                where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    repeated = {n: where[n] for n, c in names.items() if c > 1}
    assert not repeated, repeated


def test_test_files_are_named_after_behaviour_and_helpers_live_in_support():
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert not re.search(r"^def (?!spawn)", conftest, re.M), "helpers belong in tests/support.py"
    for path in (ROOT / "tests").glob("test_*.py"):
        if path.name == "test_architecture.py":
            continue
        text = path.read_text()
        assert "from conftest import" not in text and "from tests." not in text, path.name
