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
    assert "KV cache (bf16)          327,680 bytes/token, 1.25 GiB at full context" in out
    assert "KV cache (int8)          172,032 bytes/token, 0.66 GiB at full context" in out  # + a scale per head


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


# ---- the command table, shared options, first-contact fixes ----------------------------------

def test_version():
    from stablecode import __version__

    result = run("--version", command=("stablecode",))
    assert result.returncode == 0 and result.stdout.decode().strip() == f"stablecode {__version__}"


def test_serve_help_lists_the_shared_and_server_options_without_torch():
    # `python -m stablecode` is the `stablecode` command; -X importtime names each module imported.
    result = run("serve", "--help", command=(sys.executable, "-X", "importtime", "-m", "stablecode"))
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.startswith("usage: stablecode serve")
    for option in ("--model", "--dtype", "--device", "--quantize", "--threads", "--port", "--prefix-cache-mb",
                   "--speculative", "--kv-cache", "--index"):
        assert option in out
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "stablecode.options" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_every_command_registers_under_its_listed_name_and_help():
    from stablecode.cli import COMMANDS, build_parser

    for command in COMMANDS:
        parser = build_parser([command.name])
        action = next(a for a in parser._actions if a.dest == "command")
        listed = {choice.dest: choice.help for choice in action._choices_actions}
        assert listed[command.name] == command.help, command.name


@pytest.mark.parametrize("argv", [["complete", "x"], ["serve"], ["eval", "lines", "--data", "d"], ["quantize", "--out", "o",
                                                                                                  "--method", "int8"]])
def test_model_options_are_the_same_everywhere(argv):
    from stablecode.cli import build_parser

    args = build_parser(argv).parse_args(argv + ["--model", "m", "--dtype", "bfloat16", "--device", "cpu",
                                                 "--threads", "3"])
    assert (args.model, args.dtype, args.device, args.threads) == ("m", "bfloat16", "cpu", 3)


def test_complete_and_serve_take_the_same_kv_cache_option():
    from stablecode.cli import build_parser
    from stablecode.server.cli import engine_options

    complete = build_parser(["complete"]).parse_args(["complete", "x", "--kv-cache", "int8"])
    serve = build_parser(["serve"]).parse_args(["serve", "--kv-cache", "int8"])
    assert complete.kv_cache == serve.kv_cache == "int8"
    assert engine_options(serve)["kv_cache_dtype"] == "int8"
    assert build_parser(["serve"]).parse_args(["serve"]).kv_cache == "auto"
    with pytest.raises(SystemExit):
        build_parser(["serve"]).parse_args(["serve", "--kv-cache", "fp8"])


def test_complete_through_an_int8_kv_cache(initialised):
    prompt = "def add(a, b):\n"
    expected = Completer(initialised, kv_cache_dtype="int8").complete(prompt, max_new_tokens=12).text
    result = run("complete", "--model", initialised, "--max-new-tokens", 12, "--kv-cache", "int8", prompt)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == expected + "\n"


def test_stop_escapes_mean_the_same_in_complete_and_eval():
    from stablecode.cli import build_parser

    argv = ["--stop", "\\n", "--stop", "\\t#", "--stop", "a\\\\nb", "--stop", "\\d"]
    complete = build_parser(["complete"]).parse_args(["complete", "x", *argv])
    humaneval = build_parser(["eval"]).parse_args(["eval", "humaneval", "--out", "o", *argv])
    assert complete.stop == humaneval.stop == ["\n", "\t#", "a\\nb", "\\d"]


def test_complete_stops_at_an_escaped_newline(initialised):
    prompt = "def add(a, b):\n"
    expected = Completer(initialised).complete(prompt, max_new_tokens=40, stop=["\n"]).text
    result = run("complete", "--model", initialised, "--max-new-tokens", 40, "--stop", "\\n", prompt)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == expected + "\n" and "\n" not in expected


def test_prompt_argument_and_file_together_are_refused(initialised, tmp_path):
    prompt_file = tmp_path / "p.py"
    prompt_file.write_text("def f():")
    assert_one_line_error(run("complete", "--model", initialised, "--file", prompt_file, "x"), "not both")


def test_complete_threads(initialised, capsys):
    assert main(["complete", "--model", str(initialised), "--max-new-tokens", "3", "--threads", "1", "x"]) == 0
    import torch

    assert torch.get_num_threads() == 1
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = run("complete", "--model", initialised, "--threads", "0", "x")
    assert result.returncode == 2 and "--threads: must be at least 1" in result.stderr.decode()


def test_complete_into_a_closed_pipe_exits_quietly(initialised):
    # `stablecode complete ... | head -c0`: the reader is gone before the first write.
    read_end, write_end = os.pipe()
    process = subprocess.Popen([sys.executable, "-m", "stablecode.cli", "complete", "--model", str(initialised),
                                "--max-new-tokens", "20", "def f():"], stdout=write_end, stderr=subprocess.PIPE,
                               env=ENV)
    os.close(write_end)
    os.close(read_end)
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_init_into_an_unwritable_place_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(run("init", "--preset", "tiny", "--out", blocker / "out"), "cannot write the checkpoint")
    assert blocker.read_text() == "not a directory"
