"""The training loop: schedule, checkpoints that survive kill -9 and full disks, and scale-out that
gives the same losses as one process."""

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stablecode.checkpoint import load_model
from stablecode.config import ModelConfig
from stablecode.errors import StablecodeError
from stablecode.model import GPTNeoX
from stablecode.train import TrainConfig, learning_rate, parameter_groups, train

def logged_losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]  # a resumed run logs the replayed steps again
    return losses


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = TrainConfig(lr=1e-3, max_steps=1000, warmup_fraction=0.01, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(1e-3 / 10)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(505, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-3)
    assert learning_rate(1000, config) == pytest.approx(1e-4)
    assert all(learning_rate(s, config) >= learning_rate(s + 1, config) for s in range(10, 1000))


def test_no_weight_decay_on_norms_and_biases():
    model = GPTNeoX(ModelConfig.from_preset("tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"gpt_neox.final_layer_norm.weight",
                                                          "gpt_neox.layers.0.attention.dense.bias"}


def test_training_learns_and_leaves_a_loadable_checkpoint(config_for, packed, tmp_path):
    config = config_for(packed, tmp_path / "run", max_steps=20, eval_every=10, save_every=10)
    history = train(config, validation_data=None, progress=False)
    assert history["loss"][-1] < history["loss"][0] - 1.0
    assert all(math.isfinite(g) and g > 0 for g in history["grad_norm"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(log[0])
    final = tmp_path / "run" / "final"
    model = load_model(final)
    assert model.embed_out.weight.dtype == torch.bfloat16
    assert (final / "tokenizer.json").exists() and (final / "train_config.json").exists()
    assert json.loads((final / "train_config.json").read_text())["max_steps"] == 20


def test_a_peak_measured_under_load_is_measured_again_rather_than_reporting_mfu_above_one(
        config_for, packed, tmp_path, monkeypatch):
    from stablecode.train import loop

    measured = iter([1.0])  # the first measurement: a machine busy with something else
    monkeypatch.setattr(loop, "measure_peak_flops", lambda device, dtype: next(measured, 1e15))
    train(config_for(packed, tmp_path / "run", max_steps=3, peak_tflops=None), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(0 < entry["mfu"] <= 1 for entry in log)


def test_validation_loss_is_plotted(config_for, packed, tmp_path):
    from stablecode.data.packing import PackedTokens

    data = PackedTokens(packed, "train")
    history = train(config_for(packed, tmp_path / "run", max_steps=4, eval_every=2), validation_data=data,
                    progress=False)
    assert history["val_step"] == [2, 4] and all(math.isfinite(v) for v in history["val_loss"])
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_9_at_any_moment_resumes_with_the_same_losses(config_for, packed, tmp_path):
    steps = 12
    reference = train(config_for(packed, tmp_path / "reference", max_steps=steps, save_every=1), progress=False)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "stablecode.train", "--data", str(packed), "--out", str(out), "--model", "tiny",
               "--micro-batch-size", "2", "--max-steps", str(steps), "--lr", "3e-3", "--precision", "fp32",
               "--eval-every", "1000", "--save-every", "1", "--peak-tflops", "0.1", "--seed", "7", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        latest = out / "checkpoints" / "latest"
        if latest.exists() and int(latest.read_text().split("-")[1]) >= 4:
            break
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)  # mid-step or mid-save: wherever it is
    process.wait()

    resumed = train(config_for(packed, out, max_steps=steps, save_every=1), progress=False)
    assert resumed["step"] == list(range(1, steps + 1))
    assert resumed["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert logged_losses(out)[steps] == pytest.approx(reference["loss"][-1], abs=1e-5)


def test_a_full_disk_during_save_keeps_the_previous_checkpoint(config_for, packed, tmp_path, monkeypatch):
    import stablecode.checkpoint as checkpoint

    real_save = checkpoint.save_file
    calls = {"n": 0}

    def save_until_disk_fills(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write part of the file, then run out of space
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_until_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(config_for(packed, out, max_steps=6, save_every=3), progress=False)
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-0000003"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000003"]  # no half-written dirs
    load_model(checkpoints / "step-0000003")
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    history = train(config_for(packed, out, max_steps=6, save_every=3), progress=False)
    assert history["step"][-1] == 6


def test_bad_configurations_are_refused_clearly(config_for, packed, tmp_path):
    with pytest.raises(StablecodeError, match="longer than the model's 16 positions"):
        config = config_for(packed, tmp_path / "a", model=str(tmp_path / "small.json"))
        ModelConfig.from_preset("tiny").replace(max_position_embeddings=16).save(tmp_path / "small.json")
        train(config, progress=False)
    with pytest.raises(StablecodeError, match="fewer than one global batch"):
        train(config_for(packed, tmp_path / "b", micro_batch_size=10_000), progress=False)
    with pytest.raises(StablecodeError, match="unknown training config keys: learning_rate"):
        (tmp_path / "bad.json").write_text('{"learning_rate": 0.1}')
        TrainConfig.from_json(tmp_path / "bad.json")


# ---- scale-out with torchrun (2 CPU processes, gloo) ---------------------------------------------

def torchrun(args: list[str], out: Path, nproc: int = 2) -> dict[int, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "stablecode.train", *args, "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return logged_losses(out)


def cli_args(packed: Path, **values) -> list[str]:
    defaults = dict(data=packed, model="tiny", max_steps=4, lr=3e-3, precision="fp32", eval_every=1000,
                    save_every=2, peak_tflops=0.1, seed=7)
    args = []
    for key, value in {**defaults, **values}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.slow
def test_two_way_data_parallel_with_zero1_matches_one_process(config_for, packed, tmp_path):
    single = train(config_for(packed, tmp_path / "single", max_steps=4, save_every=2, micro_batch_size=4),
                   progress=False)
    parallel = torchrun(cli_args(packed, micro_batch_size=2), tmp_path / "dp")  # 2 ranks x 2 = global batch 4
    assert [parallel[s] for s in range(1, 5)] == pytest.approx(single["loss"], abs=1e-5)
    assert (tmp_path / "dp" / "checkpoints" / "step-0000004" / "training_state.pt").exists()


@pytest.mark.slow
def test_two_way_tensor_parallel_matches_one_process(config_for, packed, tmp_path):
    single = train(config_for(packed, tmp_path / "single", max_steps=4, save_every=2), progress=False)
    parallel = torchrun(cli_args(packed, micro_batch_size=2, tensor_parallel=2), tmp_path / "tp")
    assert [parallel[s] for s in range(1, 5)] == pytest.approx(single["loss"], abs=1e-5)
    # The gathered checkpoint is the same model a single process would have written.
    ours = load_model(tmp_path / "single" / "checkpoints" / "step-0000004", dtype=torch.float32)
    theirs = load_model(tmp_path / "tp" / "checkpoints" / "step-0000004", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids)).abs().max().item() <= 1e-4
