"""The `stablecode` command line as a user runs it: init → info → complete; one-line errors, exit 2."""

import os
import subprocess
import sys

import pytest

from stablecode import Completer
from stablecode.cli import main

ENV = dict(os.environ, PYTHONIOENCODING="utf-8")


def run(*args, stdin: bytes | None = None, command=(sys.executable, "-m", "stablecode.cli")):
    return subprocess.run([*command, *map(str, args)], input=stdin if stdin is not None else b"",
                          capture_output=True, env=ENV, timeout=120)


def assert_one_line_error(result, *fragments):
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stablecode: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory, byte_tokenizer_file):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = run("init", "--preset", "tiny", "--out", out, "--tokenizer", byte_tokenizer_file, "--seed", 3,
                 "--dtype", "float32", command=("stablecode",))
    assert result.returncode == 0, result.stderr.decode()
    assert "wrote tiny (" in result.stderr.decode()
    return out


def test_init_writes_a_checkpoint(initialised):
    assert sorted(p.name for p in initialised.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_info(initialised, capsys):
    assert main(["info", "--model", str(initialised)]) == 0
    out = capsys.readouterr().out
    assert "layers                   2" in out and "vocabulary               512" in out
    from stablecode import PRESETS

    assert f"parameters               {PRESETS['tiny'].num_parameters:,}" in out


def test_info_of_the_3b_preset(capsys):
    assert main(["info", "--preset", "stablecode-completion-alpha-3b-4k"]) == 0
    out = capsys.readouterr().out
    assert "parameters               2,769,310,720" in out
    assert "rotary                   20 of 80 dims per head, base 10000" in out
    assert "weights bfloat16/float16     5.16 GiB" in out
    assert "327,680 bytes/token" in out


def test_complete_from_argument_file_and_stdin(initialised, tmp_path):
    prompt = "def add(a, b):\n    return"
    expected = Completer(initialised).complete(prompt, max_new_tokens=12).text
    options = ("--model", initialised, "--max-new-tokens", 12)
    from_argument = run("complete", *options, prompt)
    assert from_argument.returncode == 0, from_argument.stderr.decode()
    assert from_argument.stdout.decode() == expected + "\n"
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_text(prompt)
    from_file = run("complete", *options, "--no-stream", "--file", prompt_file)
    assert from_file.stdout.decode() == expected + "\n"
    from_stdin = run("complete", *options, stdin=prompt.encode())
    assert from_stdin.stdout.decode() == expected + "\n"

def test_show_prompt(initialised, capsys):
    prompt = "for i in range("
    expected = Completer(initialised).complete(prompt, max_new_tokens=5).text
    assert main(["complete", "--model", str(initialised), "--max-new-tokens", "5", "--show-prompt", prompt]) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"


def test_errors_are_one_line_and_exit_2(initialised, tmp_path):
    assert_one_line_error(run("complete", "--model", tmp_path / "absent", "x"), "no such checkpoint directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((initialised / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes((initialised / "model.safetensors").read_bytes()[:1000])
    assert_one_line_error(run("complete", "--model", broken, "x"), "truncated")


@pytest.mark.parametrize("args, fragment", [
    (["init", "--preset", "huge", "--out", "{tmp}/x"], "unknown preset 'huge'"),
    (["init", "--preset", "tiny", "--out", "{tmp}/x", "--tokenizer", "{tmp}/none.json"], "tokenizer file not found"),
    (["info", "--model", "{tmp}/none"], "no such checkpoint directory"),
    (["complete", "--model", "{ckpt}", "--file", "{tmp}/none.py"], "cannot read prompt"),
    (["complete", "--model", "{ckpt}", "--top-p", "0", "x"], "top_p"),
    (["complete", "--model", "{ckpt}", "--temperature", "-1", "x"], "temperature"),
    (["complete", "--model", "{ckpt}", "--device", "cuda:7", "x"], "cuda"),
])
def test_more_errors_in_process(initialised, tmp_path, capsys, args, fragment):
    args = [a.format(tmp=tmp_path, ckpt=initialised) for a in args]
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stablecode: error:") and fragment in err[0]
