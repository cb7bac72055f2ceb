"""Line completion: metrics as CodeXGLUE computes them, line sampling, the next-line stop, end to end."""

import json
import random

import pytest

from stablecode.api import Completer
from stablecode.cli import main
from stablecode.eval.lines import (LinesError, collect_sources, edit_similarity, evaluate_lines, exact_match,
                                   lcs_length, predicted_line, sample_lines, score)

SOURCE = "import os\n\n\ndef f(x):\n    y = x + 1\n\n    return y\n"


def lcs_reference(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, ca in enumerate(a):
        for j, cb in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if ca == cb else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab c(") for _ in range(rng.randrange(0, 90)))
        b = "".join(rng.choice("ab c)") for _ in range(rng.randrange(0, 90)))
        assert lcs_length(a, b) == lcs_reference(a, b)


def test_edit_similarity_is_fuzzywuzzys_ratio():
    # Values from fuzzywuzzy's README (fuzz.ratio, python-Levenshtein backend).
    assert edit_similarity("this is a test", "this is a test!") == 97
    assert edit_similarity("fuzzy wuzzy was a bear", "wuzzy fuzzy was a bear") == 91
    assert edit_similarity("same", "same") == 100
    assert edit_similarity("", "x") == 0 and edit_similarity("abc", "xyz") == 0


def test_exact_match_ignores_whitespace_layout():
    assert exact_match("return  x", "return x")
    assert not exact_match("return x", "return y")
    assert score(["  return x ", "a"], ["return x", "b"]) == {"exact_match": 50.0, "edit_similarity": 50.0}


def test_lines_are_sampled_after_the_previous_non_blank_line():
    examples = sample_lines([("a.py", SOURCE)], count=10, seed=0)
    assert sorted(e.line_number for e in examples) == [4, 5, 7]  # line 1 has nothing before it; blanks skipped
    by_line = {e.line_number: e for e in examples}
    assert by_line[4].prompt == "import os" and by_line[4].target == "def f(x):" and by_line[4].previous == "import os"
    assert by_line[7].prompt == SOURCE[:SOURCE.index("\n\n    return")] and by_line[7].target == "    return y"
    assert by_line[7].previous == "    y = x + 1"
    assert sample_lines([("a.py", SOURCE)], 2, seed=5) == sample_lines([("a.py", SOURCE)], 2, seed=5)


def test_lines_spread_over_files_first():
    sources = [(f"f{i}.py", SOURCE) for i in range(4)]
    assert sorted(e.source for e in sample_lines(sources, 4, seed=1)) == ["f0.py", "f1.py", "f2.py", "f3.py"]


def test_predicted_line_is_the_next_line_with_content():
    assert predicted_line("\n    return y\n    z") == "    return y"
    assert predicted_line("  # tail of the prompt's line\n\n  x = 1\n") == "  x = 1"
    assert predicted_line("\n    unfinished", finished=False) is None
    assert predicted_line("\n    unfinished") == "    unfinished"
    assert predicted_line("no newline at all") is None


@pytest.fixture
def source_dir(tmp_path):
    directory = tmp_path / "src"
    (directory / "pkg").mkdir(parents=True)
    for i in range(3):
        (directory / "pkg" / f"m{i}.py").write_text(SOURCE.replace("x + 1", f"x + {i}"))
    (directory / "notes.txt").write_text("not python\nat all\n")
    return directory


def test_collect_sources(source_dir, tmp_path):
    names = [name for name, _ in collect_sources([source_dir])]
    assert [n.rsplit("/", 1)[1] for n in names] == ["m0.py", "m1.py", "m2.py"]
    assert len(collect_sources([source_dir / "pkg" / "m0.py", source_dir / "notes.txt"])) == 2
    with pytest.raises(LinesError, match="no such file"):
        collect_sources([tmp_path / "missing"])
    with pytest.raises(LinesError, match="no source files"):
        collect_sources([source_dir], extensions=(".rs",))


def test_pack_directory_gives_its_validation_files(tmp_path):
    """A pack's index.json names the starcoderdata folder and the held-out fraction: only held-out files come back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stablecode.data.starcoder import is_validation

    data = tmp_path / "starcoderdata"
    (data / "python").mkdir(parents=True)
    ids = [f"file-{i}" for i in range(40)]
    pq.write_table(pa.table({"content": [f"x = {i}\ny = {i}\n" for i in range(40)], "id": ids,
                             "max_stars_repo_name": ["r"] * 40, "max_stars_repo_path": ids, "max_stars_count": [1] * 40}),
                   data / "python" / "train-00000-of-00001.parquet")
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "index.json").write_text(json.dumps({"data_dir": str(data), "validation_fraction": 0.3,
                                                 "mix": {"languages": ["python"], "weights": {"python": 1.0}}}))
    sources = collect_sources([pack])
    expected = [f"python/{i}" for i in ids if is_validation(i, 0.3)]
    assert 0 < len(expected) < 40
    assert [name for name, _ in sources] == expected
    with pytest.raises(LinesError, match="none of the languages"):
        collect_sources([pack], languages=("rust",))


def test_end_to_end_on_a_tiny_model(tiny_checkpoint, source_dir, tmp_path, capsys):
    completer = Completer(tiny_checkpoint)
    report = evaluate_lines(completer.model, completer.tokenizer, collect_sources([source_dir]), num_lines=6,
                            seed=0, max_new_tokens=12, batch_size=4, out_dir=tmp_path / "out")
    assert report["lines"] == 6 and report["files"] == 3
    assert report["baseline_previous_line"]["exact_match"] == 0.0  # no line here repeats the one before
    assert 0 <= report["model"]["edit_similarity"] <= 100
    rows = [json.loads(line) for line in (tmp_path / "out" / "lines_results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("\n" not in r["prediction"] for r in rows)
    assert report["model"]["exact_match"] == 100 * sum(r["exact_match"] for r in rows) / 6
    # Greedy: the same again.
    again = evaluate_lines(completer.model, completer.tokenizer, collect_sources([source_dir]), num_lines=6,
                           seed=0, max_new_tokens=12, batch_size=2)
    assert again["model"] == report["model"]

    assert main(["eval", "lines", "--data", str(source_dir), "--model", str(tiny_checkpoint), "--num-lines", "3",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "baseline: previous line" in printed
    assert json.loads((tmp_path / "cli" / "lines_report.json").read_text())["lines"] == 3
