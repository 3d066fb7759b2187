"""The layer, cycle and private-name rules (tests/helpers/layers.py) hold for the tree, and the
checker catches what it is for: a synthetic tree with one bad import, one cycle or one use of
another module's private name fails, naming it."""

from __future__ import annotations

import textwrap
from fnmatch import fnmatch
from pathlib import Path

import pytest

from helpers.layers import check_tree, old_name_imports, private_imports, sys_path_edits

ROOT = Path(__file__).resolve().parent.parent

#: Cycles being removed by other work, so they do not fail this test meanwhile (none today):
ALLOWED_CYCLES: list[tuple[str, ...]] = [
]


def test_the_tree_keeps_its_layers_and_has_no_import_cycles():
    problems = check_tree(ROOT, allowed_cycles=ALLOWED_CYCLES)
    assert not problems, "\n".join(problems)


OUTSIDE = [path for folder in ("tests", "benchmarks", "samples", "scripts") for path in (ROOT / folder).rglob("*.py")]
PACKAGES = [path for folder in ("formats", "runtime", "qtbuild") for path in (ROOT / folder).rglob("*.py")]


def test_nothing_imports_the_old_top_level_names():
    problems = old_name_imports(OUTSIDE, ROOT)
    assert not problems, "\n".join(problems)


def test_nothing_edits_sys_path():
    problems = sys_path_edits(OUTSIDE + PACKAGES, ROOT)
    assert not problems, "\n".join(problems)


#: (module, private name it uses) pairs that cannot be fixed yet, each with a comment saying why
#: (none today), e.g. ("qtbuild.cli.run", "qtbuild.runtime.loader._parse"):
ALLOWED_PRIVATE_USES: list[tuple[str, str]] = [
]


def test_no_module_uses_another_modules_private_names():
    problems = [line for line in private_imports(ROOT) if not any(
        f" {module} uses the private name {name} " in line for module, name in ALLOWED_PRIVATE_USES)]
    assert not problems, "\n".join(problems)


def test_sys_path_edits_are_found(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("import sys\nsys.path.insert(0, '..')\nsys.path += ['x']\nprint(sys.path)\n")
    assert [line.split(":")[1] for line in sys_path_edits([script], tmp_path)] == ["2", "3"]


# --------------------------------------------------------------------------- the checker itself

def make_tree(root: Path, files: dict[str, str]) -> Path:
    """A minimal project tree: the three folders as packages, plus ``files`` (path → source)."""
    for package in ("qtbuild", "formats", "runtime", "runtime/sdk", "qtbuild/cli"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(source))
    return root


def test_a_clean_synthetic_tree_passes(tmp_path):
    tree = make_tree(tmp_path, {
        "formats/eif.py": "import struct\n",
        "runtime/loader.py": "from qtbuild.formats import eif\n",
        "runtime/sdk/qtsm.py": "from . import client\n",
        "runtime/sdk/client.py": "import socket\n",
        "qtbuild/cli/run.py": "from qtbuild.runtime.loader import load\nimport qtbuild\n",
    })
    assert check_tree(tree) == []


@pytest.mark.parametrize("name, source, expected", [
    ("formats/eif.py", "from qtbuild.runtime import loader\n",
     "formats/eif.py:1: qtbuild.formats.eif (layer qtbuild.formats) imports qtbuild.runtime.loader"),
    ("formats/eif.py", "def late():\n    import qtbuild.cli.run\n",
     "formats/eif.py:2: qtbuild.formats.eif (layer qtbuild.formats) imports qtbuild.cli.run"),
    ("runtime/loader.py", "from ..cli import run\n",
     "runtime/loader.py:1: qtbuild.runtime.loader (layer qtbuild.runtime) imports qtbuild.cli.run"),
    ("runtime/loader.py", "from formats.eif import read\n",
     "runtime/loader.py:1: imports the old top-level name 'formats.eif'"),
    ("qtbuild/cli/run.py", "import runtime\n",
     "qtbuild/cli/run.py:1: imports the old top-level name 'runtime'"),
    ("runtime/sdk/qtsm.py", "from qtbuild.formats.eif import read\n",
     "runtime/sdk/qtsm.py:1: qtbuild.runtime.sdk.qtsm imports qtbuild.formats.eif: the SDK imports nothing"),
    ("runtime/sdk/qtsm.py", "from .. import loader\n",
     "runtime/sdk/qtsm.py:1: qtbuild.runtime.sdk.qtsm imports qtbuild.runtime.loader: the SDK imports nothing"),
])
def test_a_bad_import_fails_naming_it(tmp_path, name, source, expected):
    tree = make_tree(tmp_path, {
        "formats/eif.py": "import struct\n", "runtime/loader.py": "import os\n", "qtbuild/cli/run.py": "import os\n",
        name: source,
    })
    problems = check_tree(tree)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_cycle_fails_naming_its_modules(tmp_path):
    tree = make_tree(tmp_path, {
        "runtime/a.py": "from qtbuild.runtime import b\n",
        "runtime/b.py": "def later():\n    from qtbuild.runtime.c import x\n",
        "runtime/c.py": "from .a import y\n",
    })
    assert check_tree(tree) == [
        "import cycle: qtbuild.runtime.a -> qtbuild.runtime.b -> qtbuild.runtime.c -> qtbuild.runtime.a"
    ]
    allowed = check_tree(tree, allowed_cycles=[("qtbuild.runtime.?",)])
    assert allowed == []


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path):
    tree = make_tree(tmp_path, {
        "runtime/enclave/__init__.py": "from .manager import Manager\n",
        "runtime/enclave/manager.py": "from . import state\n",
        "runtime/enclave/state.py": "import os\n",
    })
    assert check_tree(tree) == []
    (tree / "runtime/enclave/state.py").write_text("from qtbuild.runtime.enclave import Manager\n")
    assert check_tree(tree) == [
        "import cycle: qtbuild.runtime.enclave -> qtbuild.runtime.enclave.manager -> "
        "qtbuild.runtime.enclave.state -> qtbuild.runtime.enclave"
    ]


@pytest.mark.parametrize("name, source, target", [
    ("qtbuild/cli/run.py", "from qtbuild.runtime.loader import _parse\n", "qtbuild.runtime.loader._parse"),
    ("runtime/proxy.py", "from .loader import load, _Reader as Reader\n", "qtbuild.runtime.loader._Reader"),
    ("runtime/proxy.py", "def late():\n    from . import loader\n    return loader._parse\n",
     "qtbuild.runtime.loader._parse"),
    ("qtbuild/cli/run.py", "import qtbuild.runtime.loader\nqtbuild.runtime.loader._parse()\n",
     "qtbuild.runtime.loader._parse"),
    ("qtbuild/cli/run.py", "import qtbuild.runtime.loader as loader\nloader._CACHE.clear()\n",
     "qtbuild.runtime.loader._CACHE"),
    ("qtbuild/cli/run.py", "from qtbuild import runtime\nx = runtime.loader._parse\n",
     "qtbuild.runtime.loader._parse"),
    ("qtbuild/cli/run.py", "from qtbuild.runtime.enclave._impl import state\n", "qtbuild.runtime.enclave._impl.state"),
    ("runtime/enclave/manager.py", "from ._impl import _secret\n", "qtbuild.runtime.enclave._impl._secret"),
])
def test_a_private_name_used_from_another_module_fails_naming_it(tmp_path, name, source, target):
    tree = make_tree(tmp_path, {"runtime/loader.py": "def _parse(): ...\n", "runtime/enclave/__init__.py": "",
                                "runtime/enclave/_impl.py": "state = _secret = 1\n", name: source})
    problems = private_imports(tree)
    assert len(problems) == 1 and problems[0].startswith(f"{name}:"), problems
    assert f"uses the private name {target} " in problems[0]


def test_own_privates_dunders_private_modules_in_their_package_and_other_objects_pass(tmp_path):
    tree = make_tree(tmp_path, {
        "runtime/loader.py": "import os\n_CACHE = {}\ndef _parse(): return _CACHE\nos._exit\n",
        "runtime/enclave/__init__.py": "from ._impl import state\nfrom . import _impl\n",
        "runtime/enclave/_impl.py": "state = 1\n",
        "runtime/enclave/manager.py": "from qtbuild.runtime.enclave._impl import state\n",
        "qtbuild/cli/run.py": "from qtbuild import __version__\nfrom qtbuild.runtime import loader\n"
                              "class A:\n    def f(self, other):\n        return self._x, other._y, loader.__name__\n",
    })
    assert private_imports(tree) == []


def test_every_test_directory_is_collected(request):
    """pytest skips directories matching ``norecursedirs`` (by default even one called build)."""
    patterns = request.config.getini("norecursedirs")
    skipped = [path.relative_to(ROOT) for path in (ROOT / "tests").rglob("*") if path.is_dir()
               and path.name != "__pycache__" and any(fnmatch(path.name, pattern) for pattern in patterns)]
    assert not skipped, f"norecursedirs hides {skipped}"
