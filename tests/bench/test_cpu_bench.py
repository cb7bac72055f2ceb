"""scripts/bench/cpu.py --rounds: engines run in turn, figures are medians over the rounds, and each
ratio is taken within a round (engines close in time), then the median."""


def result(prefill_s: float, decode_tok_s: float, rss: int = 100) -> dict:
    return {"load_s": 1.0, "prefill_s": {"512": prefill_s}, "decode_tok_s": decode_tok_s, "peak_rss": rss,
            "weight_bytes": 10}


def test_rounds_merge_to_medians_and_keep_every_round(bench_script):
    bench = bench_script("cpu")
    merged = bench.merge_rounds([result(2.0, 10.0, 100), result(4.0, 30.0, 300), result(3.0, 20.0, 200)])
    assert merged["prefill_s"] == {"512": 3.0} and merged["decode_tok_s"] == 20.0
    assert merged["peak_rss"] == 300
    assert [r["decode_tok_s"] for r in merged["rounds"]] == [10.0, 30.0, 20.0]
    assert bench.merge_rounds([result(2.0, 10.0)]) == result(2.0, 10.0)


def test_ratios_are_taken_within_each_round(bench_script):
    bench = bench_script("cpu")
    # The machine's speed changes between rounds. Within the rounds ours decodes 1.5x, 1.25x and 3x
    # as fast: the median is 1.5x, where the ratio of the engines' own medians (7.5 / 6) would be 1.25x.
    ours = bench.merge_rounds([result(1.0, 15.0), result(2.0, 7.5), result(4.0, 6.0)])
    peer = bench.merge_rounds([result(2.0, 10.0), result(4.0, 6.0), result(8.0, 2.0)])
    [line] = [line for line in bench.ratios({"ours-int8": ours, "llamacpp-q8_0": peer}, [512], 512) if line]
    assert line == ("ours-int8 vs llamacpp-q8_0: prefill 512: 2.00x (rounds 2.00-2.00), "
                    "decode: 1.50x (rounds 1.25-3.00)")
    # One round: no spread to report.
    [single] = [line for line in bench.ratios({"ours-int8": result(1.0, 15.0), "llamacpp-q8_0": result(2.0, 10.0)},
                                              [512], 512) if line]
    assert single == "ours-int8 vs llamacpp-q8_0: prefill 512: 2.00x, decode: 1.50x"


def test_decode_bandwidth_is_set_against_the_probe_taken_beside_each_engine(bench_script):
    bench = bench_script("cpu")
    machine = {"cpu": "test", "cores": 2, "flags": [], "torch": "x", "load_average": [0, 0, 0]}
    ours = dict(result(1.0, 2.0), weight_bytes=10 * 10**9, read_gb_s=40.0)  # 20 GB/s decoding
    peer = dict(result(1.0, 1.0), weight_bytes=10 * 10**9)  # no probe of its own: the run's first one
    text = bench.report({"machine": machine, "settings": {"prompt_tokens": "512"}, "linear_params": 1,
                         "read_gb_s": 20.0, "ours-int8": ours, "ct2-int8": peer})
    assert "| 20.0 (50% of 40.0) |" in text and "| 10.0 (50% of 20.0) |" in text
    # Rounds keep the median of their probes.
    assert bench.merge_rounds([dict(ours, read_gb_s=30.0), ours, dict(ours, read_gb_s=50.0)])["read_gb_s"] == 40.0
