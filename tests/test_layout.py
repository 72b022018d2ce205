"""The layout's rules (docs/architecture.md), checked on the source: no import cycle, data flows one way."""

import ast
import os
from pathlib import Path

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "epo_trl")


def _modules() -> dict[str, tuple[str, bool]]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                is_pkg = rel.endswith(".__init__")
                out[rel[: -len(".__init__")] if is_pkg else rel] = (path, is_pkg)
    return out


def _imports(module: str, path: str, is_pkg: bool, mods, top_level_only: bool) -> set[str]:
    """Project modules `module` imports (at import time only, or anywhere), without its own parent packages."""
    tree = ast.parse(Path(path).read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` / `if __name__ == ...` bodies are not import-time edges we follow
        nodes = [n for n in nodes if not isinstance(n, ast.If)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            parts = module.split(".") if is_pkg else module.split(".")[:-1]
            base = parts[: len(parts) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if target and target.startswith("epo_trl"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in mods else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("epo_trl")}
    out = set()
    for dep in found:
        parts = dep.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            name = ".".join(parts[:i])
            if name in mods and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


def test_no_import_cycle():
    mods = _modules()
    _assert_acyclic({m: _imports(m, p, pkg, mods, top_level_only=True) for m, (p, pkg) in mods.items()})


def test_the_env_packages_have_no_cycle_even_through_deferred_imports():
    """Within epo_trl.envs, an import inside a function counts too: the pool interface (base.py) must not build the
    pools that import it (`create_pool` lives in pool/factory.py)."""
    mods = _modules()
    envs = {m: v for m, v in mods.items() if m.startswith("epo_trl.envs.")}
    graph = {
        m: {d for d in _imports(m, p, pkg, mods, top_level_only=False) if d in envs} for m, (p, pkg) in envs.items()
    }
    _assert_acyclic(graph)
    assert "epo_trl.envs.pool.processes" in graph["epo_trl.envs.pool.factory"]
    assert not graph["epo_trl.envs.pool.base"] & {"epo_trl.envs.pool.processes", "epo_trl.envs.pool.threads"}


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for dep in sorted(graph[m]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*stack, m, dep])
            if dep not in state:
                visit(dep, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_data_flows_one_way():
    """envs know no rollout, rollout knows no trainer, the math modules import nothing from the project."""
    mods = _modules()
    for module, (path, is_pkg) in mods.items():
        deps = _imports(module, path, is_pkg, mods, top_level_only=False) - {"epo_trl"}
        if module.startswith("epo_trl.envs"):
            assert not {d for d in deps if not d.startswith("epo_trl.envs")}, (module, deps)
        if module.startswith("epo_trl.rollout"):
            assert not {d for d in deps if d.startswith(("epo_trl.trainers", "epo_trl.cli"))}, (module, deps)
        if module.startswith("epo_trl.trainers"):
            assert not {d for d in deps if d.startswith("epo_trl.cli")}, (module, deps)
        if module.endswith(("_math", ".gigpo")):
            assert not deps, (module, deps)


def test_the_package_never_imports_the_research_tooling_and_ships_without_it():
    """research/ (studies, benchmarks) uses the package; the package, installed alone, must not need research/."""
    mods = _modules()
    for module, (path, _) in mods.items():
        tree = ast.parse(Path(path).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {n for n in names if n.split(".")[0] == "research"}, module
    assert not [m for m in mods if m.split(".")[1:2] in (["bench"], ["study"], ["study_llm"])]
