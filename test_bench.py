"""bench.py: the reference configuration is faithful and the benchmark runs end to end."""
import json

import torch

import bench
from map_at_k import map_at_k


def test_bench_reference_map_at_k_equals_first_hit_variant():
    """The authors' loop computes the reciprocal rank of the first hit: map_at_k's first-hit."""
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    s_pos, e_pos = torch.tensor([0, 3, 10, 20, 38, 39]), torch.tensor([1, 5, 12, 25, 39, 39])
    for k, delta in ((10, 5), (3, 2), (20, 4)):
        ours = float(map_at_k(start, end, s_pos, e_pos, k=k, delta=delta, variant="first-hit"))
        assert abs(bench.reference_map_at_k(start, end, s_pos, e_pos, k=k, delta=delta) - ours) < 1e-6


def test_bench_reference_extract_finds_best_valid_span():
    import numpy as np
    s, e = [0.0] * 8, [0.0] * 8
    s[5], e[3] = 9.0, 8.0          # best start after best end: not a valid span
    s[2], e[4] = 6.0, 4.0
    offsets = [np.array([[0, 0], [0, 0], [0, 3], [4, 6], [7, 9], [10, 12], [13, 15], [0, 0]])]
    context = [np.array([False, False, True, True, True, True, True, False])]
    score, window, a, b = bench.reference_extract([s], [e], offsets, context)[0]
    assert (window, a, b) == (0, 0, 6) and score == 14.0     # tokens 2..3; 5..3 (17) is no span


def test_bench_quick_runs_and_prints_json(capsys):
    bench.main(["--quick", "--shape", "tiny", "--steps", "1", "--reps", "1", "--eval-examples", "16",
                "--batch-size", "8", "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["shape"] == "tiny" and result["device"].startswith("cpu")
    for part in ("train", "eval"):
        r = result[part]
        assert r["ours_fps"] > 0 and r["reference_fps"] > 0
        assert abs(r["speedup"] - r["ours_fps"] / r["reference_fps"]) < 0.02
    assert 0.0 <= result["eval"]["same_answers"] <= 1.0
