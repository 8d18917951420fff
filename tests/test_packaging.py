"""The model, kernels, train-step and engine paths import only the core stack (jax, optax,
orbax, numpy), so they run on an accelerator host with nothing else installed; the package's
rooms import only downwards (README, Architecture)."""

import ast
import subprocess
import sys
from pathlib import Path

HEAVY = ("grain", "tokenizers", "tensorboardX", "yaml", "tqdm", "fastapi", "uvicorn", "qwix", "torch",
         "transformers", "mlflow", "prometheus_client", "jinja2", "flax", "chex")
PACKAGE = Path(__file__).resolve().parent.parent / "lmsys"


def test_core_paths_import_no_heavy_libraries():
    code = ("import sys, lmsys, lmsys.config, lmsys.models, lmsys.kernels, lmsys.parallel, "
            "lmsys.train.step, lmsys.checkpoint, lmsys.serve.engine; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported lmsys module, at module level?)] for every module of the package,
    read from the source (a `from lmsys.x import name` counts as importing lmsys.x.name when
    that is a module, else lmsys.x)."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            found += [(t, id(node) in top) for t in targets if t.split(".")[0] == "lmsys"]
        out[name] = found
    return out


def test_rooms_import_only_downwards():
    imports = _imports()
    wrong = [(m, t) for m, ts in imports.items() for t, _ in ts
             if (m.startswith("lmsys.parallel") and t.startswith("lmsys.models"))
             or (m.split(".")[1] in ("models", "kernels", "parallel", "data", "train")
                 and t.startswith("lmsys.serve"))]
    assert not wrong, wrong


def test_no_import_cycles_at_module_level():
    graph = {m: {t for t, top in ts if top and t != m} for m, ts in _imports().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these by concern: {long}"
