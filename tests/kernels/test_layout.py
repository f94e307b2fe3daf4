"""The op-family template of ``based_kernels/README.md``: every family has ``__init__.py`` (re-exports), ``ops.py``
(API and autograd) and ``reference.py`` (plain PyTorch); a family imports only its own modules and the shared
``_common`` / ``_jit_common``; no module imports Megatron, megatron_based or DeepSpeed. Read from the source (ast),
nothing is imported."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "based_kernels"
FAMILIES = ["taylor_attention", "sliding_window", "short_conv", "rope", "rms_norm", "cross_entropy"]
SHARED = {"_common", "_jit_common"}


def _imports(path):
    """(level, module, names) of every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(0, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", tuple(a.name for a in node.names)))
    return out


def test_every_family_is_a_subpackage_on_the_template():
    found = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    assert found == sorted(FAMILIES)
    for fam in FAMILIES:
        for name in ("__init__.py", "ops.py", "reference.py", "README.md"):
            assert (PKG / fam / name).is_file(), f"{fam}/{name} missing"


@pytest.mark.parametrize("fam", FAMILIES)
def test_init_reexports_only(fam):
    """``__init__.py``: a docstring and imports from its own ``ops`` / ``reference``, no code."""
    tree = ast.parse((PKG / fam / "__init__.py").read_text())
    assert ast.get_docstring(tree)
    for node in tree.body[1:]:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1 and node.module in ("ops", "reference"), ast.dump(node)
        else:
            assert isinstance(node, ast.Assign) and node.targets[0].id == "__all__", ast.dump(node)


@pytest.mark.parametrize("fam", FAMILIES)
def test_no_sideways_imports(fam):
    for path in (PKG / fam).glob("*.py"):
        for level, module, names in _imports(path):
            if level == 2:  # based_kernels.<x>: only the shared modules
                targets = {module} if module else set(names)
                assert targets <= SHARED, f"{path.name} imports {targets} from another part of based_kernels"
            elif level == 0:
                assert not module.startswith("based_kernels"), f"{path.name} imports {module}"
            if path.name == "reference.py" and level == 1:
                pytest.fail(f"{fam}/reference.py imports the family's own modules ({module}): it stands alone")


def test_no_megatron_or_deepspeed_imports():
    for path in PKG.rglob("*.py"):
        for level, module, _ in _imports(path):
            if level == 0:
                root = module.split(".")[0]
                assert root not in ("megatron", "megatron_based", "deepspeed"), f"{path} imports {module}"
