"""The package's layers: every module imports only from a lower layer or a sibling in its own, and
only the top layer reads the Hydra config (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlfuse"
# Layer of each module (longest prefix wins); a module may import from its own layer or lower ones.
LAYERS = {
    "rlfuse.errors": 0, "rlfuse.seeding": 0, "rlfuse.images": 0, "rlfuse.trajectories": 0, "rlfuse.bounded_http": 0,
    "rlfuse.toy.world": 0, "rlfuse.toy.detect": 0, "rlfuse.toy": 0, "rlfuse": 0,
    "rlfuse.annotate": 0.5,  # apart: the labelling app, on the base only; training reads its files
    "rlfuse.families": 1, "rlfuse.dynamics": 1, "rlfuse.policy": 1, "rlfuse.rollout": 1, "rlfuse.lora": 1,
    "rlfuse.rewards": 1, "rlfuse.prompts": 1, "rlfuse.advantages": 1, "rlfuse.feedback": 1, "rlfuse.sampling": 1,
    "rlfuse.algorithms": 2,
    "rlfuse.sources": 3,
    "rlfuse.engine": 4,
    "rlfuse.train": 5, "rlfuse.config": 5, "rlfuse.cli": 5, "rlfuse.sample": 5, "rlfuse.evaluate": 5,
    "rlfuse.reproduce": 5, "rlfuse.export": 5, "rlfuse.reward_server": 5, "rlfuse.toy.pretrain": 5, "rlfuse.__main__": 5,
}
TOP = 5
CONFIG_LIBRARIES = ("hydra", "omegaconf")


def layer(module: str) -> float:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise AssertionError(f"{module}: no layer assigned in tests/test_layers.py")


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "rlfuse"]
    return names


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_imports_go_down_the_layers_and_only_the_top_reads_the_config(module, path):
    own = layer(module)
    for name in imports(path):
        if name.startswith("rlfuse"):
            assert layer(name) <= own, f"{module} (layer {own}) imports {name} (layer {layer(name)})"
        if name.split(".")[0] in CONFIG_LIBRARIES:
            assert own == TOP, f"{module} reads the Hydra config ({name}); only the top layer may"
