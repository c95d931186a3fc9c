"""The import structure the design promises: no cycles, and stages that import no integrations.

Read from the source, so an import hidden inside a function counts too; only
imports under ``if TYPE_CHECKING:`` (annotations) are left out.
"""

from __future__ import annotations

import ast
import pathlib

import resilient

PACKAGE = pathlib.Path(resilient.__file__).parent

# The stage modules and the core they stand on: the stdlib, and each other only as listed.
STAGES = {
    "resilient.bulkhead": {
        "resilient._config",
        "resilient._driver",
        "resilient._fork",
        "resilient.adaptive",
        "resilient.deadline",
        "resilient.errors",
        "resilient.stages",
    },
    "resilient.adaptive": {"resilient._config", "resilient._fork", "resilient.errors"},
    "resilient.retry": {
        "resilient._config",
        "resilient._driver",
        "resilient._fork",
        "resilient.errors",
        "resilient.stages",
    },
    "resilient.breaker": {
        "resilient._config",
        "resilient._driver",
        "resilient._fork",
        "resilient.breaker.store",
        "resilient.errors",
        "resilient.stages",
    },
    "resilient.breaker.store": {"resilient._fork"},
    "resilient.fallback": {"resilient._config", "resilient._driver", "resilient.errors"},
    "resilient.hedge": {
        "resilient._config",
        "resilient._driver",
        "resilient._fork",
        "resilient.errors",
    },
    "resilient.ratelimit": {
        "resilient._config",
        "resilient._driver",
        "resilient._fork",
        "resilient.deadline",
        "resilient.errors",
        "resilient.shardmap",
    },
    "resilient.quorum": {"resilient._config", "resilient.deadline", "resilient.errors"},
    "resilient.shardmap": {"resilient._config", "resilient._fork"},
    "resilient.chaos.faults": {
        "resilient._config",
        "resilient._driver",
        "resilient.chaos._dice",
        "resilient.deadline",
        "resilient.errors",
    },
    "resilient.chaos._dice": set(),
    "resilient.chaos.proxy": {"resilient._config", "resilient.chaos._dice"},
    "resilient.chaos.middleware": {"resilient._config", "resilient.chaos._dice"},
    "resilient.deadline": {"resilient._config", "resilient.errors"},
    "resilient.errors": set(),
    "resilient._config": set(),
    "resilient.stages": set(),
    "resilient._fork": set(),
    "resilient._specialize": set(),
    # Pure: the cluster client and the KV node share it without the RPC stack.
    "resilient.rpc.versions": set(),
    "resilient._driver": {
        "resilient._fork",
        "resilient._specialize",
        "resilient.deadline",
        "resilient.errors",
        "resilient.stages",
        "resilient._compat.otel",
    },
}
# Libraries no stage module may import, even lazily: integrations live elsewhere.
INTEGRATIONS = {"httpx", "opentelemetry", "pybreaker", "tenacity", "redis", "msgspec", "uvicorn"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports at run time, as absolute dotted names."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from resilient import tracing` imports the submodule resilient.tracing;
            # `from resilient import Policy` imports the package itself.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if is_module(candidate) else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_no_module_imports_the_package_root_or_forms_a_cycle() -> None:
    """Following imports (lazy ones included) never leads a module back to itself."""
    edges = graph()
    for name, targets in edges.items():
        if name != "resilient":
            assert "resilient" not in targets, f"{name} imports the package root"

    def walk(node: str, path: list[str]) -> None:
        for target in sorted(edges[node]):
            if target in path:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            walk(target, [*path, target])

    for name in edges:
        walk(name, [name])


def test_stage_modules_import_only_the_core_and_no_integration() -> None:
    """Stage modules never import policy, tracing, transport, or httpx/OpenTelemetry/tenacity."""
    for name, allowed in STAGES.items():
        path = PACKAGE / (name.removeprefix("resilient.").replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        imported = imports_of(path)
        ours = {target for target in imported if target.startswith("resilient")}
        assert ours <= allowed, f"{name} imports {sorted(ours - allowed)}"
        foreign = {target.split(".")[0] for target in imported} & INTEGRATIONS
        assert not foreign, f"{name} imports {sorted(foreign)}"


def test_the_walk_sees_lazy_imports() -> None:
    """The walker counts an import inside a function, and skips TYPE_CHECKING ones."""
    tracing_imports = imports_of(PACKAGE / "tracing" / "__init__.py")
    assert "opentelemetry.trace" in tracing_imports or "opentelemetry" in tracing_imports
    policy_imports = imports_of(PACKAGE / "policy.py")
    assert "resilient._compat.pybreaker" in policy_imports  # imported inside _as_gate
    assert "opentelemetry.trace" not in policy_imports  # only under TYPE_CHECKING


def test_only_resilient_redis_imports_redis_py() -> None:
    """redis-py is an optional extra: no module outside resilient.redis imports it or that."""
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name == "resilient.redis" or name.startswith("resilient.redis."):
            continue
        imported = imports_of(path)
        assert "redis" not in {target.split(".")[0] for target in imported}, name
        assert not any(t == "resilient.redis" or t.startswith("resilient.redis.") for t in imported)
