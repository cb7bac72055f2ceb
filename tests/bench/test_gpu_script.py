"""scripts/bench/gpu.sh: on a machine without an NVIDIA GPU it refuses at once with one clear line
and exit status 2; its steps (scripts/bench/gpu.py) run end to end on the CPU with a tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(has_gpu(), reason="this machine has an NVIDIA GPU: gpu.sh would run for real")
def test_gpu_script_refuses_cleanly_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "bench" / "gpu.sh")], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, OUT=str(tmp_path)))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0] and "nothing was run" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_gpu_benchmark_refuses_without_cuda_even_when_called_directly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "gpu.py")], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_gpu_benchmark_steps_run_on_the_cpu_with_a_tiny_model(tmp_path):
    output = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "gpu.py"), "--device", "cpu", "--preset", "tiny",
                    "--no-compile", "--prompt-tokens", "32", "--prefill-tokens", "64", "--new-tokens", "4",
                    "--batch", "3", "--output", str(output)], check=True, capture_output=True, timeout=300, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    results = json.loads(output.read_text())
    assert results["parity"]["argmax_agreement"] >= 0.95  # the same weights in transformers
    assert results["parity"]["max_abs_error_of_spread"] < 0.02
    assert results["engine_batch"]["finished"] == 3 and results["engine_batch"]["tok_s"] > 0
    assert results["decode_batch1_eager"]["tok_s"] > 0 and results["prefill"]["tokens"] == 64
