"""`stablecode data pypi`: licences from wheel metadata, exact and near duplicates, held-out packages."""

import json
import zipfile

import pytest

from stablecode.cli import main
from stablecode.data import DataError
from stablecode.data.pypi import (NearDuplicateIndex, build_tree, classify_license, read_package_list,
                                  spdx_expression_license)
from stablecode.data.sources import from_dir

MIT = "Permission is hereby granted, free of charge, to any person obtaining a copy"
GPL = "GNU GENERAL PUBLIC LICENSE Version 3, 29 June 2007"


def write_wheel(folder, name, version, files, metadata=(), license_file=None):
    """A minimal wheel: METADATA lines, an optional licence file, and the given members."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", "\n".join(["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}",
                                                  *metadata]) + "\n\nLong description.\n")
        if license_file:
            z.writestr(f"{info}/licenses/LICENSE", license_file)
        for member, text in files.items():
            z.writestr(member, text)
    return path


def module(i, extra=""):
    return (f"def function_{i}(values, scale={i}):\n    total = 0\n    for value in values:\n"
            f"        total += value * scale + {i}\n    return total  # {extra}\n\n\n"
            f"class Thing{i}:\n    def __init__(self, name):\n        self.name = name + '{i}'\n")


def metadata(text):
    import email.parser

    return email.parser.Parser().parsestr(text)


@pytest.mark.parametrize("expression,kept", [
    ("MIT", "MIT"), ("Apache-2.0 OR BSD-3-Clause", "Apache-2.0 OR BSD-3-Clause"),
    ("GPL-2.0-or-later OR MIT", "GPL-2.0-or-later OR MIT"), ("MPL-2.0 AND (Apache-2.0 OR MIT)", None),
    ("LGPL-3.0-only", None), ("Apache-2.0 WITH LLVM-exception", "Apache-2.0 WITH LLVM-exception"),
    ("LicenseRef-Proprietary", None), ("MIT) AND (", None),
])
def test_spdx_expressions(expression, kept):
    assert spdx_expression_license(expression)[0] == kept


def test_licence_sources_in_order_of_precedence():
    assert classify_license(metadata("License-Expression: MIT\nClassifier: License :: OSI Approved :: "
                                     "GNU General Public License v3 (GPLv3)\n"), {})[0] == "MIT"
    assert classify_license(metadata("Classifier: License :: OSI Approved :: BSD License\n"), {})[0] == "BSD-3-Clause"
    licence, why, _ = classify_license(metadata("Classifier: License :: OSI Approved :: "
                                                "GNU General Public License v2 (GPLv2)\n"), {})
    assert licence is None and "GPL-2.0" in why
    assert classify_license(metadata("License: Apache 2.0\n"), {})[0] == "Apache-2.0"
    assert classify_license(metadata(""), {"LICENSE": f"MIT License\n\n{MIT} ..."})[0] == "MIT"
    licence, why, _ = classify_license(metadata(""), {"LICENSE": GPL})
    assert licence is None and "GPL-3.0" in why
    licence, why, _ = classify_license(metadata(""), {})
    assert licence is None and why == "no licence in metadata or licence files"


def test_near_duplicates_are_found_and_different_files_are_not():
    index = NearDuplicateIndex(threshold=0.85)
    base = "\n".join(module(i) for i in range(30))
    assert index.add_if_new("a", base.encode()) is None
    assert index.add_if_new("b", base.replace("total", "totl", 1).encode()) == "a"  # one edit
    assert index.add_if_new("c", "\n".join(module(i) for i in range(100, 130)).encode()) is None


def test_build_tree_keeps_permissive_packages_and_removes_copies_of_held_out_code(tmp_path):
    wheels = tmp_path / "wheels"
    shared = "\n".join(module(i, "vendored") for i in range(20))
    write_wheel(wheels / "heldout", "evalpkg", "1.0", {"evalpkg/core.py": shared}, ["License-Expression: MIT"])
    write_wheel(wheels / "train", "alpha", "2.0", {
        "alpha/__init__.py": module(1), "alpha/_vendor/core.py": shared,  # a copy of held-out code
        "alpha/again.py": module(1), "alpha/data.txt": "not python",
        "alpha/gpl_part.py": "# SPDX-License-Identifier: GPL-3.0-only\n" + module(7)},
        ["Classifier: License :: OSI Approved :: MIT License"])
    write_wheel(wheels / "train", "beta", "0.1", {"beta/x.py": module(2)}, ["License-Expression: LGPL-3.0-only"])
    write_wheel(wheels / "train", "gamma", "3", {"gamma/y.py": module(3)}, license_file=f"MIT License\n{MIT}")
    stdlib = tmp_path / "lib"
    (stdlib / "site-packages" / "other").mkdir(parents=True)
    (stdlib / "site-packages" / "other" / "z.py").write_text(module(9))
    (stdlib / "json").mkdir()
    (stdlib / "json" / "decoder.py").write_text(module(4))
    result = build_tree(wheels / "train", wheels / "heldout", tmp_path / "tree", stdlib=stdlib, stdlib_version="3.11.7")
    tree = tmp_path / "tree"
    taken = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.py"))
    assert taken == ["heldout/evalpkg-1.0/evalpkg/core.py", "train/alpha-2.0/alpha/__init__.py",
                     "train/cpython-stdlib-3.11.7/json/decoder.py", "train/gamma-3/gamma/y.py"]
    decisions = json.loads((tree / "decisions.json").read_text())
    assert [(d["name"], d["reason"]) for d in decisions["dropped"]] == [
        ("beta", "License-Expression 'LGPL-3.0-only' is not permissive")]
    kinds = {d["file"].rsplit("/", 1)[-1]: (d["kind"], d["of"]) for d in decisions["duplicate_files"]}
    assert kinds["core.py"] == ("exact", "heldout/evalpkg-1.0/evalpkg/core.py")
    assert kinds["again.py"][0] == "exact" and kinds["gpl_part.py"] == ("non-permissive-header", "GPL-3.0-only")
    packages = json.loads((tree / "packages-train.json").read_text())
    assert packages["gamma-3"] == {"package": "gamma", "version": "3", "license": "MIT"}
    assert result.files == {"heldout": 1, "train": 3}

    # from-dir records package, version and licence per file from the table
    from_dir(tree / "train", tmp_path / "corpus", languages=["python"], packages=packages)
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    rows = {f["path"]: f for f in manifest["files"]}
    assert rows["alpha-2.0/alpha/__init__.py"]["package"] == "alpha"
    assert rows["alpha-2.0/alpha/__init__.py"]["license"] == "MIT"
    assert rows["cpython-stdlib-3.11.7/json/decoder.py"]["license"] == "PSF-2.0"
    assert all(len(f["sha256"]) == 64 and f["version"] for f in rows.values())


def test_package_lists_and_overlap_refused(tmp_path, capsys):
    train, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    train.write_text("# comment\nrequests==2.0  # pinned\n\nFlask_Login==1\n")
    heldout.write_text("flask-login==1\n")
    assert read_package_list(train) == ["requests==2.0", "Flask_Login==1"]
    code = main(["data", "pypi", "--train-packages", str(train), "--heldout-packages", str(heldout),
                 "--wheels", str(tmp_path / "w"), "--out", str(tmp_path / "t"), "--no-download"])
    assert code == 2 and "both trained on and held out: ['flask-login']" in capsys.readouterr().err
    with pytest.raises(DataError, match="cannot read package list"):
        read_package_list(tmp_path / "missing.txt")
