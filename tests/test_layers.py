"""Architecture rules: imports flow one way, and importing a module reads no settings."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tinymlops.settings import REPO_ROOT, MqttSettings, Settings

# Higher layers may import lower ones, never the reverse. The CLI and benchmarks sit on top.
LAYERS = {"tinymlops": 1, "firmware": 2, "registry": 3, "tasks": 4, "flows": 5}
APPLICATION_MODULES = {"tinymlops.cli", "tinymlops.bench", "tinymlops.demo", "tinymlops.__main__"}
TOP = 6


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def layer_of(module: str) -> int:
    application = module in APPLICATION_MODULES or module.startswith(("tinymlops.cli_", "tinymlops.bench_"))
    return TOP if application else LAYERS[module.split(".")[0]]


def imported_project_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n for n in names if n.split(".")[0] in LAYERS}
    return found


def test_imports_flow_one_way() -> None:
    violations = []
    for module, path in project_modules().items():
        own = layer_of(module)
        for target in imported_project_modules(path):
            same_package = target.split(".")[0] == module.split(".")[0]
            if layer_of(target) > own or (layer_of(target) == own and not same_package):
                violations.append(f"{module} imports {target}")
    assert not violations, "imports against the layering flows -> tasks -> registry -> firmware -> core:\n" + "\n".join(
        violations
    )


def test_importing_modules_reads_no_settings() -> None:
    """An invalid setting must not break an import: settings are read lazily, on first use."""
    modules = [m for m in project_modules() if not m.endswith("__main__")]
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    env = {**os.environ, "TINYMLOPS_FLEET": "not a valid fleet name!", "TINYMLOPS_MQTT__KEEPALIVE_S": "-1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_contracts_import_nothing_of_the_project() -> None:
    """The bottom layer: the standard library, numpy and other contracts only."""
    violations = []
    for path in sorted((REPO_ROOT / "tinymlops" / "contracts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            allowed = sys.stdlib_module_names | {"numpy", "__future__"}
            bad = [n for n in names if n.split(".")[0] not in allowed and not n.startswith("tinymlops.contracts")]
            violations += [f"{path.name} imports {n}" for n in bad]
    assert not violations, "\n".join(violations)


def test_tasks_read_no_settings_behind_their_callers_backs() -> None:
    """Settings are resolved at the edge (flows, the CLI) and passed down: no task calls or imports get_settings."""
    violations = []
    for path in sorted((REPO_ROOT / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name == "get_settings":
                    violations.append(f"{path.name}:{node.lineno} calls get_settings()")
            elif isinstance(node, ast.ImportFrom) and any(a.name == "get_settings" for a in node.names):
                violations.append(f"{path.name}:{node.lineno} imports get_settings")
    assert not violations, "\n".join(violations)


def test_a_runs_parameters_replace_the_settings_and_none_or_empty_keeps_them() -> None:
    """What flows resolve once at their start: the same values ``x or settings.y`` gave, one by one."""
    base = Settings(fleet="plant", mqtt=MqttSettings(url="mqtt://a:1883", username="ops"))
    assert base.overridden() == base
    assert base.overridden(fleet="", broker_url=None, targets=[], training_config=None) == base
    run = base.overridden(fleet="other", broker_url="mqtt://b:1883", targets=["rp2040"], training_config="t.yaml")
    assert (run.fleet, run.mqtt.url, run.targets.default) == ("other", "mqtt://b:1883", ["rp2040"])
    assert run.training_config == Path("t.yaml")
    assert run.mqtt.username == "ops" and run.drift == base.drift  # the rest of each section is kept
    assert (base.fleet, base.mqtt.url, base.targets.default) == ("plant", "mqtt://a:1883", Settings().targets.default)
