"""Resuming survives a lying `latest`, truncated or corrupted files and stale staging directories,
and a run without checkpoints starts from an exported model when told to."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stablecode.errors import StablecodeError
from stablecode.train import train
from stablecode.train.checkpoints import latest_checkpoint


def run(config_for, packed, out, **changes):
    return train(config_for(packed, out, **changes), progress=False)


@pytest.fixture
def three_checkpoints(config_for, packed, tmp_path):
    """A finished 6-step run with checkpoints at steps 2, 4, 6, and its losses."""
    out = tmp_path / "run"
    history = run(config_for, packed, out, max_steps=6, save_every=2, keep_checkpoints=5)
    return out, history


def test_latest_naming_a_missing_directory_falls_back_to_the_newest_complete_checkpoint(
        config_for, packed, three_checkpoints, capsys):
    out, reference = three_checkpoints
    checkpoints = out / "checkpoints"
    (checkpoints / "latest").write_text("step-0000042\n")
    assert latest_checkpoint(checkpoints) == checkpoints / "step-0000006"
    assert "step-0000042, which does not exist" in capsys.readouterr().err
    history = run(config_for, packed, out, max_steps=8, save_every=2, keep_checkpoints=5)
    assert history["step"] == list(range(1, 9))  # continued from step 6, never from 0
    assert history["loss"][:6] == reference["loss"]


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(
        config_for, packed, three_checkpoints, capsys):
    out, reference = three_checkpoints
    checkpoints = out / "checkpoints"
    weights = checkpoints / "step-0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])  # a copy cut short
    capsys.readouterr()
    history = run(config_for, packed, out, max_steps=6, save_every=2, keep_checkpoints=5)
    err = capsys.readouterr().err
    assert "skipping checkpoint step-0000006" in err and "truncated" in err and "Traceback" not in err
    assert history["step"] == list(range(1, 7))
    assert history["loss"] == pytest.approx(reference["loss"], abs=1e-5)  # steps 5-6 replayed identically
    assert (checkpoints / "latest").read_text().strip() == "step-0000006"
    load_file(str(weights))  # rewritten whole


def test_a_corrupted_file_of_the_same_size_is_caught_by_its_checksum(config_for, packed, three_checkpoints, capsys):
    out, _ = three_checkpoints
    checkpoints = out / "checkpoints"
    state = checkpoints / "step-0000006" / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert latest_checkpoint(checkpoints) == checkpoints / "step-0000004"
    assert "does not match its sha256" in capsys.readouterr().err
    listed = json.loads((checkpoints / "step-0000004" / "checksums.json").read_text())
    assert {"model.safetensors", "config.json", "training_state.pt", "train_config.json"} <= set(listed)


def test_stale_staging_directories_and_temporary_files_are_swept(config_for, packed, three_checkpoints, capsys):
    out, _ = three_checkpoints
    checkpoints = out / "checkpoints"
    (checkpoints / ".step-0000008.partial").mkdir()
    (checkpoints / ".step-0000008.partial" / "model.safetensors").write_bytes(b"half")
    (checkpoints / ".step-0000008.x1y2.tmp").mkdir()
    (checkpoints / ".latest.abc.tmp").write_text("step-0000008\n")
    run(config_for, packed, out, max_steps=6, save_every=2, keep_checkpoints=5)
    assert "removed what an interrupted save left" in capsys.readouterr().err
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_only_the_newest_checkpoints_are_kept(config_for, packed, tmp_path):
    out = tmp_path / "run"
    run(config_for, packed, out, max_steps=6, save_every=1, keep_checkpoints=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000005", "step-0000006"]


def test_a_run_without_checkpoints_starts_from_the_exported_model(config_for, packed, three_checkpoints, tmp_path):
    out, _ = three_checkpoints
    exported = out / "final"
    # lr 0: the first step cannot move the weights, so the new run's weights are exactly the export's
    history = run(config_for, packed, tmp_path / "fresh", max_steps=1, lr=0.0, init_from=str(exported))
    assert history["init_from"] == str(exported.resolve())
    start = load_file(str(exported / "model.safetensors"))
    after = load_file(str(tmp_path / "fresh" / "final" / "model.safetensors"))
    assert all(torch.equal(start[k], after[k]) for k in start)
    # and its first loss is the trained model's, far below a fresh start's
    scratch = run(config_for, packed, tmp_path / "scratch", max_steps=1, lr=0.0)
    assert history["loss"][0] < scratch["loss"][0] - 0.5


def test_init_from_is_ignored_when_the_run_has_checkpoints(config_for, packed, three_checkpoints, tmp_path):
    out, reference = three_checkpoints
    history = run(config_for, packed, out, max_steps=8, save_every=2, keep_checkpoints=5,
                  init_from=str(tmp_path / "nowhere"))
    assert history["step"] == list(range(1, 9)) and history["loss"][:6] == reference["loss"]


def test_init_from_a_model_of_another_shape_is_refused(config_for, packed, three_checkpoints, tmp_path):
    out, _ = three_checkpoints
    small = tmp_path / "small.json"
    config = json.loads((out / "final" / "config.json").read_text()) | {"intermediate_size": 128}
    small.write_text(json.dumps(config))
    with pytest.raises(StablecodeError, match="another shape"):
        run(config_for, packed, tmp_path / "other", max_steps=1, model=str(small), init_from=str(out / "final"))


def test_a_time_limit_stops_with_a_checkpoint_that_the_same_command_continues(config_for, packed, tmp_path, capsys):
    out = tmp_path / "run"
    first = run(config_for, packed, out, max_steps=6, save_every=100, time_limit_s=0.0)
    assert first["step"] == [1] and "time limit of 0 s reached: stopped at step 1" in capsys.readouterr().err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    assert not (out / "final").exists()  # not finished: nothing exported
    reference = run(config_for, packed, tmp_path / "reference", max_steps=6, save_every=100)
    finished = run(config_for, packed, out, max_steps=6, save_every=100)
    assert finished["loss"] == pytest.approx(reference["loss"], abs=1e-5) and (out / "final").exists()
