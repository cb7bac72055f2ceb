"""scripts/bench/kernel_ab.py: two kernel libraries alternate in one process over the same model,
each round's ratio is reported, identical kernels give identical logits, a swap really changes
which code runs, and a base whose kernels take other arguments is a clear error."""

import subprocess
from pathlib import Path

import pytest
import torch

from stablecode import GPTNeoX, ModelConfig, kernels
from stablecode import quantize as Q
from stablecode.model import init_weights

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def int8_model():
    if kernels.load() is None:
        pytest.fail("the CPU kernels did not build on this machine (see the warning above)")
    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig(name="ab-test", vocab_size=320, hidden_size=128, num_layers=2, num_heads=4,
                                intermediate_size=512, max_position_embeddings=128))
    init_weights(model)
    return Q.quantize_model(model.eval(), "int8")


def test_the_same_kernels_twice_agree_bit_for_bit(bench_script, int8_model):
    bench = bench_script("kernel_ab")
    library = kernels.loaded()
    result = bench.measure(int8_model, {"base": library, "this tree": library}, context=16, steps=2, rounds=3,
                           prompt_tokens=40)
    assert len(result["decode_ratio"]) == 3 and all(r > 0 for r in result["decode_ratio"])
    assert len(result["prompt_speedup"]) == 3
    assert result["same_logits"]
    text = bench.report(result, ["base", "this tree"])
    assert "median ratio" in text and "prompt of 40 tokens" in text and "same logits: yes" in text
    assert kernels.loaded() is library  # the swap is undone


def test_a_swap_changes_which_code_runs(bench_script, int8_model):
    """Without kernels (None) the int8 layers take PyTorch's weight-only path, whose float activations
    give other logits than the kernels' int8 activations."""
    bench = bench_script("kernel_ab")
    result = bench.measure(int8_model, {"torch ops": None, "kernels": kernels.loaded()}, context=8, steps=1, rounds=1)
    assert not result["same_logits"]
    assert "NO" in bench.report(result, ["torch ops", "kernels"])


def test_a_base_whose_kernels_take_other_arguments_is_a_clear_error(bench_script, int8_model):
    bench = bench_script("kernel_ab")
    library = kernels.loaded()

    class OlderKernels:  # as a revision before int8_linear took the weight row sums
        def __getattr__(self, name):
            return getattr(library, name)

        def int8_linear(self, *args):
            raise TypeError("int8_linear(): incompatible function arguments. The following argument types are "
                            "supported: (x, weight, scale, bias, isa='')")

    with pytest.raises(SystemExit, match="same signatures"):
        bench.measure(int8_model, {"old": OlderKernels(), "this tree": library}, context=8, steps=1, rounds=1)
    assert kernels.loaded() is library


def test_the_base_source_comes_from_git(bench_script):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    bench = bench_script("kernel_ab")
    assert "PYBIND11_MODULE" in bench.base_source("HEAD")
    with pytest.raises(SystemExit, match="cannot read"):
        bench.base_source("no-such-revision")


def test_weight_passes_time_each_row_count_and_compare_outputs(bench_script):
    bench = bench_script("kernel_ab")
    library = kernels.loaded()
    calls = bench.weight_passes("int8", layers=1)
    assert [k for k, _ in calls] == [2560, 2560, 2560, 10240]
    result = bench.measure_passes(calls[:2], {"base": library, "this tree": library}, rows=[1, 3], rounds=2)
    assert all(len(result["pass_s"][n][m]) == 2 for n in ("base", "this tree") for m in (1, 3))
    assert result["same_outputs"]
    text = bench.report_passes(result, ["base", "this tree"])
    assert " 3 rows:" in text and "same outputs: yes" in text
    with pytest.raises(ValueError, match="unknown weight kind"):
        bench.weight_passes("fp8", layers=1)
