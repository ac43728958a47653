"""The shape of the code (docs/architecture.md): imports only run down the layers, no import circle, strategies/
imports nothing from app/, a client process never loads the server's rule or kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from app.paths import PROJECT_DIR

# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    ("strategies",),  # the package's __init__ (it imports nothing)
    ("strategies.rules",),
    ("strategies.fair", "strategies.sampling", "strategies.identity", "strategies.replies", "strategies.nodes"),
    ("strategies.robust",),
    ("app", "app.paths", "app.rng", "app.errors"),
    ("app.training", "app.data", "app.threats", "app.records"),
    ("app.methods",),
    ("app.config",),
    ("app.client_app", "app.server_app"),
    ("app.runners", "app.analysis"),
]


def _modules(root: Path = PROJECT_DIR) -> dict[str, Path]:
    mods = {}
    for package in ("app", "strategies"):
        for path in (root / package).rglob("*.py"):
            mods[".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of every module, also inside functions and under TYPE_CHECKING, relative ones too, resolved to
    project modules. An import of the module's own package (`from app.methods import X` inside app/methods/) is
    an edge like any other: the package's __init__ imports its modules, so it closes a circle."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != module:
                    edges[module].add(found)
    return edges


def _layer(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert _cycles(_imports(_modules())) == []


def test_imports_only_run_down_the_layers() -> None:
    upward = [
        f"{m} -> {t}" for m, targets in _imports(_modules()).items() for t in sorted(targets) if _layer(t) > _layer(m)
    ]
    assert upward == []


def test_every_module_is_in_a_layer_and_every_folder_is_a_package() -> None:
    """A new module must be placed (here and in docs/architecture.md); a folder without __init__.py would be left
    out of the installed package (setuptools finds regular packages only)."""
    for module in _modules():
        _layer(module)
    for package in ("app", "strategies"):
        for folder in [PROJECT_DIR / package, *(p for p in (PROJECT_DIR / package).rglob("*") if p.is_dir())]:
            if any(folder.glob("*.py")):
                assert (folder / "__init__.py").exists(), folder


def test_the_training_steps_import_no_flower() -> None:
    """app/training/ is plain PyTorch, so the Ditto step runs and is tested without Flower."""
    for path in (PROJECT_DIR / "app" / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "flwr" or n.startswith("flwr.") for n in names), path


def test_strategies_import_nothing_from_app() -> None:
    edges = _imports(_modules())
    assert [f"{m} -> {t}" for m in edges if m.startswith("strategies") for t in edges[m] if t.startswith("app")] == []


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The import scan, the layer and circle checks catch what they are for, on made-up modules."""
    for name, text in {
        "app/__init__.py": "",
        "app/methods/__init__.py": "from app.methods.ditto import Ditto\n",
        "app/methods/ditto.py": "from app.methods import Ditto\nfrom ..config import validate\n",
        "app/config/__init__.py": "",
        "app/config/validate.py": "def f():\n    import app.runners.cli\n",
        "app/runners/__init__.py": "",
        "app/runners/cli.py": "",
        "strategies/__init__.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = _imports(_modules(tmp_path))
    assert edges["app.methods.ditto"] == {"app.methods", "app.config", "app.config.validate"}, "own package, relative"
    assert edges["app.config.validate"] == {"app.runners.cli"}, "imports inside functions"
    assert _cycles(edges) == [["app.methods", "app.methods.ditto"]]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _layer("app.runners.simulate") > _layer("app.config.compose") > _layer("app.methods.ditto")
    assert _layer("app.training.lam") == _layer("app.records.kinds")


def _fresh_process(code: str, kernel_cache: Path | None = None) -> list[str]:
    """What `code` prints, run in a new Python process (its own module cache), with its own kernel cache folder."""
    env = None if kernel_cache is None else {"DITTO_KERNEL_CACHE": str(kernel_cache), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PROJECT_DIR)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_a_client_process_loads_neither_the_server_nor_its_kernels(tmp_path: Path) -> None:
    """A client composes its config (as under `flwr run`) and trains a Krum run's round: the server's rule never
    runs, so the kernels are never built, and our server strategy is never imported (Flower 1.42's own flwr.client
    imports flwr.server, so that one is not ours to keep out)."""
    code = (
        "import sys\n"
        "from flwr.app import RecordDict\n"
        "from app.client_app import DeviceClient\n"
        "from app.config.compose import config_from_overrides\n"
        "from app.records.persistence import MemoryStore\n"
        "from app.training.models import get_weights\n"
        "from strategies.rules import kernels\n"
        "cfg = config_from_overrides('aggregator=krum num_clients=6 clients_per_round=6 local_steps=2', client=True)\n"
        "client = DeviceClient(cfg, 0, MemoryStore(RecordDict()))\n"
        "client.fit(get_weights(client._build()), {'server_round': 1})\n"
        "print(kernels.library.cache_info().currsize, 'strategies.robust' in sys.modules)\n"
    )
    assert _fresh_process(code, tmp_path) == ["0", "False"]
    assert list(tmp_path.iterdir()) == []


def test_the_server_check_of_the_same_config_does_build_them(tmp_path: Path) -> None:
    """The same config validated as the server does runs Krum once: the client test above could fail."""
    code = (
        "from app.config.compose import compose_config\n"
        "from strategies.rules import kernels\n"
        "compose_config(['aggregator=krum', 'num_clients=6', 'clients_per_round=6'])\n"
        "print(kernels.library.cache_info().currsize)\n"
    )
    assert _fresh_process(code, tmp_path) == ["1"]


def test_importing_a_client_side_helper_of_strategies_does_not_load_flowers_server() -> None:
    """strategies/__init__.py imports nothing, so the loss reweighting and the sampling load no Flower server."""
    assert _fresh_process("import sys, strategies.fair, strategies.sampling; print('flwr.server' in sys.modules)") == [
        "False"
    ]
