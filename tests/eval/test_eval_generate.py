"""HumanEval generation on a tiny random model: seeded, resumable, sharded with torchrun, end to end."""

import json
import os
import subprocess
import sys

import pytest

from stablecode.api import Completer
from stablecode.cli import main
from stablecode.eval.humaneval import (STOP_SEQUENCES, EvalError, GenerationSettings, generate_humaneval,
                                       generate_samples, load_problems, select_problems)

# HumanEval problems whose stripped prompts are short in the 512-token test tokenizer (< 110 tokens),
# so they fit the tiny preset's 256-token context with room to generate.
SHORT_TASKS = ["HumanEval/53", "HumanEval/55", "HumanEval/23", "HumanEval/45"]
MAX_LENGTH = 136


@pytest.fixture(scope="module")
def completer(tiny_checkpoint):
    return Completer(tiny_checkpoint)


@pytest.fixture(scope="module")
def problems():
    return select_problems(load_problems(), SHORT_TASKS)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_are_seeded_and_a_stopped_run_resumes_exactly(completer, problems, tmp_path):
    settings = GenerationSettings(n=2, temperature=0.8, max_length=MAX_LENGTH, seed=3)
    whole = tmp_path / "whole.jsonl"
    assert generate_samples(completer.model, completer.tokenizer, problems, settings, whole, batch_size=3) == 8
    samples = records(whole)
    assert [s["task_id"] for s in samples] == [t for t in problems for _ in range(2)]
    assert all(set(s) == {"task_id", "completion"} for s in samples)
    assert all(not any(stop in s["completion"] for stop in STOP_SEQUENCES) for s in samples)
    assert len({s["completion"] for s in samples}) > 1

    # Killed after three samples, in the middle of writing the fourth: resumes to the same file.
    stopped = tmp_path / "stopped.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    stopped.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    assert generate_samples(completer.model, completer.tokenizer, problems, settings, stopped, batch_size=5) == 5
    assert stopped.read_text() == whole.read_text()
    # Nothing left to do: nothing generated.
    assert generate_samples(completer.model, completer.tokenizer, problems, settings, stopped) == 0

    other_seed = tmp_path / "seed4.jsonl"
    generate_samples(completer.model, completer.tokenizer, problems,
                     GenerationSettings(n=2, temperature=0.8, max_length=MAX_LENGTH, seed=4), other_seed)
    assert records(other_seed) != samples


def test_extra_stop_sequences_cut_the_output(completer, problems, tmp_path):
    settings = GenerationSettings(n=2, temperature=1.0, max_length=MAX_LENGTH, stop=STOP_SEQUENCES + ("e", "\n"))
    out = tmp_path / "stop.jsonl"
    generate_samples(completer.model, completer.tokenizer, problems, settings, out)
    completions = [s["completion"] for s in records(out)]
    assert all("e" not in c and "\n" not in c for c in completions)


def test_resuming_with_other_settings_is_refused(tiny_checkpoint, problems, tmp_path):
    one = dict(n=1, max_length=MAX_LENGTH, model=str(tiny_checkpoint))
    generate_humaneval(tmp_path, GenerationSettings(**one), dict(list(problems.items())[:1]))
    with pytest.raises(EvalError, match="temperature differ"):
        generate_humaneval(tmp_path, GenerationSettings(**one | {"temperature": 0.5}), problems)
    # A larger n continues the same run; a smaller one is refused.
    generate_humaneval(tmp_path, GenerationSettings(**one | {"n": 2}), dict(list(problems.items())[:1]))
    assert len(records(tmp_path / "samples.jsonl")) == 2
    assert json.loads((tmp_path / "generation.json").read_text())["n"] == 2
    with pytest.raises(EvalError, match="more than n=1"):
        generate_humaneval(tmp_path, GenerationSettings(**one), dict(list(problems.items())[:1]))


def test_cli_generates_then_scores(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "humaneval", "--model", str(tiny_checkpoint), "--out", str(out), "--tasks",
                 ",".join(SHORT_TASKS[:2]), "--n", "2", "--max-length", str(MAX_LENGTH), "--batch-size", "4",
                 "--stop", "\\n```"]) == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "pass@2" in printed
    report = json.loads((out / "samples_report.json").read_text())
    assert (report["problems"], report["samples"], report["n"]) == (2, 4, 2)
    generation = report["generation"]
    assert generation["temperature"] == 0.2 and generation["top_p"] == 0.95 and generation["max_length"] == MAX_LENGTH
    assert generation["stop"] == list(STOP_SEQUENCES) + ["\n```"]
    assert generation["wall_time_s"] >= 0 and generation["model"] == str(tiny_checkpoint)
    assert len((out / "samples_results.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "generation.json").read_text())["n"] == 2


@pytest.mark.slow
def test_torchrun_shards_merge_into_the_single_process_file(tiny_checkpoint, problems, tmp_path):
    args = ["--model", str(tiny_checkpoint), "--tasks", ",".join(SHORT_TASKS), "--num-samples", "2", "--batch-size", "2",
            "--max-length", str(MAX_LENGTH), "--no-score"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    sharded = tmp_path / "sharded"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "stablecode.cli", "eval", "humaneval", "--out", str(sharded), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sharded.iterdir()) == ["generation.json", "samples.jsonl"]

    single = tmp_path / "single"
    settings = GenerationSettings(n=2, max_length=MAX_LENGTH, model=str(tiny_checkpoint))
    generate_humaneval(single, settings, problems, batch_size=2)
    assert (sharded / "samples.jsonl").read_text() == (single / "samples.jsonl").read_text()
