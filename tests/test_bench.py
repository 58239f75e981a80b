"""lvspec-bench end to end on the tiny pair: every mode runs, the report adds up."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def test_bench_reports_modes_side_by_side(tiny_models, tmp_path):
    out = tmp_path / "bench"
    options = {"plausibility_ratio": 0.05, "plausibility_top_k": 50}
    proc = subprocess.run(
        [sys.executable, "-m", "lvspec_vllm.bench.cli", "offline", "--target", str(tiny_models / "qwen25vl"),
         "--draft", str(tiny_models / "qwen25vl_aligned"), "--modes", "none,strict,no-id",
         "--n", "4", "--max-tokens", "10", "--lvspec-options", json.dumps(options),
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    rows = json.loads((out / "results.json").read_text())["modes"]
    assert list(rows) == ["none", "strict", "no-id"]
    # Strict speculative decoding is lossless: the target's greedy output, token for token.
    assert rows["strict"]["identical_outputs"] == 1.0
    assert rows["strict"]["token_agreement"] == 1.0
    assert rows["none"]["speedup"] == 1.0 and rows["none"]["mean_accepted_length"] is None
    for mode in ("strict", "no-id"):
        r = rows[mode]
        assert r["mean_accepted_length"] == 1 + r["accepted_per_step"] >= 1
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0
        run = json.loads((out / f"run-{mode}.json").read_text())
        drafted = run["metrics"]["vllm:spec_decode_num_draft_tokens"]
        assert run["worker"]["draft_tokens"] == drafted > 0
        accepted = run["metrics"]["vllm:spec_decode_num_accepted_tokens"]
        assert sum(r["accepts"].values()) == accepted
    assert rows["strict"]["accepts"]["plausible"] == rows["strict"]["accepts"]["semantic"] == 0
    for mode in ("strict", "no-id"):  # the draft's own clock ran, inside the run's wall time
        assert rows[mode]["draft_ms_per_step"] > 0 and 0 < rows[mode]["draft_share"] < 1
        assert rows[mode]["video_tokens"] == 16 and rows[mode]["draft_visual_tokens"] == 0
    # No identification: nothing is flagged as an anchor, so precision is undefined.
    assert rows["no-id"]["identification_precision"] is None
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in rows)
    for png in ("accepted_length.png", "fidelity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_lengthens_the_videos_for_the_draft_cost(tiny_models, tmp_path):
    """--frames 16 --upscale 2: 16 -> 128 tokens per video, and the video-aware draft sees all."""
    out = tmp_path / "long"
    proc = subprocess.run(
        [sys.executable, "-m", "lvspec_vllm.bench.cli", "offline", "--target",
         str(tiny_models / "qwen25vl"), "--draft", str(tiny_models / "qwen25vl_vl_aligned"),
         "--modes", "strict", "--n", "2", "--skip", "5", "--max-tokens", "4",
         "--frames", "16", "--upscale", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((out / "results.json").read_text())["modes"]["strict"]
    assert row["video_tokens"] == 128
    assert row["draft_visual_tokens"] == 2 * 128
    assert row["acceptance_rate"] == 1.0  # the target's own weights, seeing the long video
    md = (out / "results.md").read_text()
    assert "2 held-out videos after the first 5 (looped to 16 frames, enlarged 2x)" in md
    run = json.loads((out / "run-strict.json").read_text())
    assert run["skip"] == 5 and len(run["texts"]) == 2


def test_runs_over_different_videos_are_not_compared():
    from lvspec_vllm.bench.cli import summarise

    run = {"n": 4, "skip": 0, "k": 0, "texts": [""] * 4, "token_ids": [[]] * 4,
           "output_tokens": 0, "elapsed_s": 1.0, "metrics": {}}
    with pytest.raises(ValueError, match="different videos"):
        summarise({"none": run, "strict": {**run, "skip": 4}})


def test_lengthen_loops_frames_and_repeats_pixels():
    import numpy as np

    from lvspec_vllm.bench.world_run import lengthen, long_metadata

    clip = np.random.default_rng(0).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    long = lengthen(clip, 20, 3)
    assert long.shape == (20, 168, 168, 3)
    assert (long[8:16] == long[:8]).all() and (long[16:] == long[:4]).all()
    assert (long[:8, ::3, ::3] == clip).all() and (long[:8, 2::3, 1::3] == clip).all()
    meta = long_metadata(20)
    assert meta["total_num_frames"] == 20 and meta["frames_indices"] == list(range(20))
    assert meta["duration"] == 10.0


def test_serve_sweep_measures_throughput_per_concurrency(tiny_models, tmp_path):
    out = tmp_path / "serve"
    proc = subprocess.run(
        [sys.executable, "-m", "lvspec_vllm.bench.cli", "serve",
         "--target", str(tiny_models / "qwen25vl"),
         "--draft", str(tiny_models / "qwen25vl_aligned"), "--modes", "none,lvspec-auto",
         "--concurrency", "1,4", "--requests-per-level", "2", "--max-tokens", "8", "--ramp",
         "--repeat", "2", "--interleave", "--server-env", "VLLM_ENABLE_V1_MULTIPROCESSING=0",
         "--warmup-requests", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    runs = {r["mode"]: r for r in json.loads((out / "serve.json").read_text())["runs"]}
    for mode, run in runs.items():
        # --ramp: 1, 4, then back to 1
        assert [lv["concurrency"] for lv in run["levels"]] == [1, 4, 1]
        for lv in run["levels"]:
            assert lv["output_tokens"] == 8 * lv["requests"] and lv["tokens_per_s"] > 0
    assert all(lv["mean_k"] is None for lv in runs["none"]["levels"])
    # --interleave: both servers of a round up at once, the modes taking turns at each level,
    # so every mode's level j ran before any mode's level j + 1
    for i in range(2):
        rounds = [json.loads((out / f"serve-{m}-r{i}.json").read_text())["levels"]
                  for m in runs]
        starts = [[lv["started"] for lv in levels] for levels in rounds]
        for j in range(2):
            assert max(s[j] for s in starts) < min(s[j + 1] for s in starts), starts
        # each server answered its warm-up requests before the levels, kept apart
        for m in runs:
            done = json.loads((out / f"serve-{m}-r{i}.json").read_text())
            assert done["warmup"]["requests"] == 3 and done["warmup"]["output_tokens"] == 24
            assert done["warmup"]["started"] < done["levels"][0]["started"]
    # each round's speedup over none at a level, and their median
    for lv in runs["lvspec-auto"]["levels"]:
        assert len(lv["speedup_runs"]) == 2 and lv["speedup"] > 0
    assert runs["none"]["levels"][0]["speedup_runs"] == [1.0, 1.0]
    # auto_k's choices are read back per level from /metrics
    auto = runs["lvspec-auto"]["levels"]
    assert sum(sum(lv["auto_k_steps"].values()) for lv in auto) > 0
    # the draft's own clock, per level, as a share of the level's wall time
    assert all(0 <= lv["draft_share"] < 1 for lv in auto) and any(lv["draft_share"] > 0
                                                                   for lv in auto)
    assert all(lv["draft_share"] == 0 for lv in runs["none"]["levels"])
    assert "the draft's share of wall time" in (out / "serve.md").read_text()
    # where a request's time went, from vLLM's histograms, per level
    for lv in auto + runs["none"]["levels"]:
        assert 0 < lv["prefill_ms"] and 0 < lv["decode_ms"], lv
        assert lv["prefill_ms"] <= lv["ttft_ms"] <= lv["e2e_ms"], lv
    assert "time to first token" in (out / "serve.md").read_text()
    # where the CPU went, per level, and how many requests were inside vLLM on average
    for lv in auto + runs["none"]["levels"]:
        cpu = lv["cpu_s"]
        # --server-env reached the server: the model ran in the engine core, no worker process
        assert cpu["client"] > 0 and cpu["api_server"] > 0 and cpu["engine_core"] > 0, cpu
        assert cpu["worker"] == 0, cpu
        assert 0 < lv["in_engine"] <= lv["concurrency"] * 1.05, lv
    assert "Little's law" in (out / "serve.md").read_text()
    assert "server environment `VLLM_ENABLE_V1_MULTIPROCESSING=0`" in (out / "serve.md").read_text()
    for png in ("throughput.png", "k_chosen.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_serve_runs_report_the_median_per_level():
    from lvspec_vllm.bench.serve_sweep import markdown, median_run

    def run(mode, *levels):
        return {"mode": mode, "speculative_config": None, "levels": [
            {"concurrency": c, "requests": 2 * c, "output_tokens": 64 * c, "elapsed_s": 1.0,
             "tokens_per_s": t, "mean_accepted_length": None if k is None else 1 + k,
             "auto_k_steps": {}, "mean_k": k, "draft_share": share,
             "draft_skipped_steps": 10 * c, "draft_plain_steps": 6 * c}
            for c, t, k, share in levels]}

    none = median_run([run("none", (1, 100, None, 0), (4, 300, None, 0)),
                       run("none", (1, 120, None, 0), (4, 200, None, 0)),
                       run("none", (1, 90, None, 0), (4, 250, None, 0))])
    assert [lv["tokens_per_s"] for lv in none["levels"]] == [100, 250]
    assert none["levels"][1]["tokens_per_s_runs"] == [300, 200, 250] and none["repeats"] == 3
    auto = median_run([run("lvspec-auto", (1, 80, 1.0, 0.2), (4, 240, None, 0.1)),
                       run("lvspec-auto", (1, 110, 2.0, 0.4), (4, 260, 0.0, 0.3))])
    assert auto["levels"][0]["mean_k"] == 1.5 and auto["levels"][1]["mean_k"] == 0.0
    assert auto["levels"][0]["draft_share"] == pytest.approx(0.3)
    md = markdown([none, auto], "header")
    assert "| none | 100.0 [90-120] (1.00x) | 250.0 [200-300] (1.00x) |" in md
    assert "| lvspec-auto | 95.0 [80-110] (0.95x; 2.50; k 1.5) |" in md
    # the draft's share; steps without a draft forward / of them plain (medians)
    assert "| lvspec-auto | 30% (10 / 6) | 20% (40 / 24) |" in md
    # against none's rounds one by one: 80 / 100 and 110 / 120 at one request
    paired = median_run([run("lvspec-auto", (1, 80, 1.0, 0.2), (4, 240, None, 0.1)),
                         run("lvspec-auto", (1, 110, 2.0, 0.4), (4, 260, 0.0, 0.3))],
                        base=[run("none", (1, 100, None, 0), (4, 300, None, 0)),
                              run("none", (1, 120, None, 0), (4, 200, None, 0))])
    assert paired["levels"][0]["speedup_runs"] == pytest.approx([0.8, 110 / 120])
    assert paired["levels"][0]["speedup"] == pytest.approx((0.8 + 110 / 120) / 2)
    assert "| lvspec-auto | 95.0 [80-110] (0.86x; 2.50; k 1.5) |" in markdown([paired], "h")


def test_paired_ratios_over_rounds_and_sweeps_with_their_interval(tmp_path, capsys):
    import json
    import math

    from lvspec_vllm.bench import paired

    def sweep(none, auto):
        return {"runs": [{"mode": m, "levels": [
            {"concurrency": c, "tokens_per_s": runs[0], "tokens_per_s_runs": runs}
            for c, runs in zip((1, 4), levels)]} for m, levels in (("none", none), ("a", auto))]}

    one = sweep([[100, 200], [400, 400]], [[90, 200], [360, 440]])
    two = sweep([[100], [400]], [[110], [400]])
    levels, ratios = paired.paired_ratios([one, two], "a", "none")
    assert levels == [1, 4] and ratios == [pytest.approx([0.9, 1.0, 1.1]), pytest.approx([0.9, 1.1, 1.0])]
    mean, lo, hi = paired.ratio_interval([0.9, 1.0, 1.1])
    logs = [math.log(r) for r in (0.9, 1.0, 1.1)]
    sd = math.sqrt(sum((x - sum(logs) / 3) ** 2 for x in logs) / 2)
    assert mean == pytest.approx(math.exp(sum(logs) / 3))
    assert math.log(hi / mean) == pytest.approx(4.303 * sd / math.sqrt(3))
    assert lo < mean < hi and math.isnan(paired.ratio_interval([1.2])[1])  # one round
    # more rounds of the same spread: a narrower interval
    wide, narrow = (paired.ratio_interval([0.9, 1.1] * n) for n in (2, 8))
    assert narrow[2] - narrow[1] < wide[2] - wide[1]
    files = []
    for i, s in enumerate((one, two)):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(s))
    paired.main([*map(str, files), "--mode", "a"])
    out = capsys.readouterr().out
    assert "| a / none | 1.00x [" in out and "| rounds | 3 | 3 | 6 |" in out
    with pytest.raises(SystemExit, match="'b' is not in a sweep"):
        paired.paired_ratios([one], "b", "none")
    three = sweep([[100]], [[100]])
    with pytest.raises(SystemExit, match="different levels"):
        paired.paired_ratios([one, three], "a", "none")


def test_repeated_offline_runs_report_the_median_throughput_and_its_range():
    from lvspec_vllm.bench.cli import markdown, merge_repeats, summarise

    def run(mode, elapsed):
        return {"mode": mode, "k": 4 if mode != "none" else 0, "n": 2, "skip": 0,
                "texts": ["a red circle moves left.", "a blue square moves up."],
                "token_ids": [[1, 2, 3], [4, 5]], "output_tokens": 100, "elapsed_s": elapsed,
                "video_tokens": 16, "metrics": {}, "worker": {}}

    assert merge_repeats([run("none", 2.0)]) == run("none", 2.0)  # one run stays as it was
    none = merge_repeats([run("none", 1.0), run("none", 0.5), run("none", 2.0)])
    assert none["output_tokens"] / none["elapsed_s"] == pytest.approx(100)  # the median
    assert none["tokens_per_s_range"] == [50, 200] and none["repeats"] == 3
    strict = merge_repeats([run("strict", 1.25), run("strict", 2.5)])  # 80 and 40 tokens/s
    rows = summarise({"none": none, "strict": strict})
    assert rows["strict"]["tokens_per_s"] == pytest.approx(60)
    assert rows["strict"]["speedup"] == pytest.approx(0.6)
    md = markdown(rows, "header")
    assert "| none | 0 | – | – | 100.0 [50-200] | 1.00 |" in md
    assert "| strict | 4 | – | – | 60.0 [40-80] | 0.60 |" in md


def test_auto_k_trace_summary_splits_prefill_and_the_steps_auto_k_fits():
    from lvspec_vllm.bench.auto_k_trace import summarise

    rows = [[4, 2, 0, 0.006, None],    # first step: no previous k, not a sample
            [4, 2, 0, 0.006, 2], [4, 2, 0, 0.008, 2],
            [4, 0, 0, 0.010, 2],       # a switch: left out
            [4, 0, 0, 0.003, 0],
            [5, 0, 38, 0.012, 0],      # a prefill chunk rode along
            [5, 0, 0, None, 0],        # no time (the engine was idle before it)
            [4, 2, 0, 0.004, 2, 0.5]]  # half its rows cold: not a whole step at k = 2
    s = summarise(rows)
    assert s["steps"] == 7 and s["prefill_steps"] == 1
    assert s["k_above_0_samples"] == {"whole": 2, "partly cold": 1, "all cold": 0}
    assert s["prefill_share"] == pytest.approx(0.012 / 0.049)
    assert s["decode_ms"] == {"4,0": (1, pytest.approx(3.0)), "4,2": (2, pytest.approx(7.0))}
    assert s["exploration_steps"] == 0  # the old format has no table's k
    # the current format: wall seconds for every step, sample or not, and the table's k
    rows = [[4, 0, 0, None, None, None, 0.010, 0],
            [4, 0, 0, 0.010, 0, 1.0, 0.010, 0],
            [4, 1, 0, None, 0, None, 0.030, 0],   # an exploration: the switch
            [4, 1, 0, 0.020, 1, 0.25, 0.020, 0],  # and a sample at a quarter of rows warm
            [4, 0, 0, None, 1, None, 0.015, 0],   # the switch back
            [4, 0, 0, 0.010, 0, 1.0, 0.010, 0],
            [4, 0, 0, None, 0, None, None, 0]]    # after an idle engine
    s = summarise(rows)
    assert s["steps"] == 6
    assert s["exploration_steps"] == 3
    assert s["exploration_share"] == pytest.approx(0.065 / 0.095)
    assert s["k_above_0_samples"] == {"whole": 0, "partly cold": 1, "all cold": 0}
    assert s["decode_ms"] == {"4,0": (2, pytest.approx(10.0))}
    assert s["cold_ms"] == {"4,1": {"partly cold": (1, pytest.approx(20.0))}}
    assert s["tokens"] == {}  # no output tokens in this format
    # with the output tokens: what the whole steps emitted, a row and per wall second
    rows = [[2, 4, 0, 0.020, 4, 1.0, 0.020, 4, 1.0, 6],
            [2, 4, 0, 0.010, 4, 1.0, 0.010, 4, 1.0, 4],
            [2, 4, 0, 0.010, 4, 0.5, 0.010, 4, 0.5, 3]]  # partly cold: not counted
    assert summarise(rows)["tokens"] == {"2,4": (pytest.approx(2.5), pytest.approx(3.0))}


def test_auto_k_trace_time_by_kind_and_the_acceptance_at_one_request(tmp_path, capsys):
    from lvspec_vllm.bench import auto_k_trace

    rows = [[1, 0, 0, 0.005, 0, 1.0, 0.005, 0, 1.0, 1],
            [1, 0, 0, 0.005, 0, 1.0, 0.005, 0, 1.0, 1],
            [1, 2, 0, None, 0, None, 0.010, 0, 1.0, 1],    # an exploration: the switch
            [1, 2, 0, 0.015, 2, 1.0, 0.015, 0, 1.0, 3],    # whole, all accepted
            [1, 2, 0, 0.015, 2, 1.0, 0.015, 2, 1.0, 1],    # the table's: none accepted
            [1, 2, 0, 0.015, 2, 1.0, 0.015, 2, 1.0, 2],
            [1, 2, 30, 0.050, 2, 1.0, 0.050, 2, 1.0, 1],   # prefill: not an outcome
            [2, 0, 0, 0.007, 0, 1.0, 0.007, 0, 1.0, 2]]    # another batch size
    t = auto_k_trace.time_by_kind(rows, 1, 1)
    total = 0.005 * 2 + 0.010 + 0.015 * 3 + 0.050
    assert t[("whole", "decode", "table")] == (2, pytest.approx(0.030 / total),
                                               pytest.approx(15.0), pytest.approx(10.0))
    assert t[("switch", "decode", "exploration")][:3] == (1, pytest.approx(0.010 / total),
                                                         pytest.approx(10.0))
    assert t[("k = 0", "decode", "table")][0] == 2
    assert sum(n for n, *_ in t.values()) == 7
    # whole steps at one request emitting 3, 1 and 2 tokens: position 1 accepted in 2 of 3,
    # position 2 in 1 of 2
    a = auto_k_trace.acceptance_at_one(rows, span=2)
    # the first three whole steps follow no prefill step at batch 1: not placed along a request
    assert a == {2: {"emitted": [1, 1, 1], "alpha": [pytest.approx(2 / 3), 0.5], "along": []}}
    # a request alone: its prefill step (1 token), then whole steps at k = 2 of 3, 3 and 1
    one = [[1, 2, 30, 0.05, 2, 1.0, 0.05, 2, 1.0, 1]] + [
        [1, 2, 0, 0.015, 2, 1.0, 0.015, 2, 1.0, n] for n in (3, 3, 1)]
    a = auto_k_trace.acceptance_at_one(one, span=4)
    assert a[2]["along"] == [(0, 1, 3.0), (4, 2, 2.0)]  # after 1 and 4, 7 tokens
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    auto_k_trace.main([str(path), "--batches", "1"])
    assert "whole, decode, table: 2, " in capsys.readouterr().out
    # where the table's k is 0: its own steps 10 ms for 2 tokens; the exploration's two steps
    # 25 ms for 4 tokens, 5 ms beyond the table's 5 ms a token
    cost = auto_k_trace.exploration_cost(rows, 1, 1)
    assert cost == {"steps": 2, "share": pytest.approx(0.025 / total),
                    "beyond": pytest.approx(0.005 / total),
                    "table_ms_per_token": pytest.approx(5.0)}
    assert auto_k_trace.exploration_cost(rows, 3, 8) is None
    auto_k_trace.main([str(path)])
    out = capsys.readouterr().out
    assert "batch 1, k = 2, whole decode-only steps emitting 1..3 tokens: [1, 1, 1]" in out
    assert "  1-1, 2: 3 steps, 3 rows, 2.00 tokens" in out


def test_auto_k_trace_tokens_per_drafting_row_by_doubling_of_the_batch_size():
    from lvspec_vllm.bench.auto_k_trace import drafting_rows

    rows = [[1, 4, 0, 0.02, 4, 1.0, 0.02, 4, 1.0, 3],
            [2, 4, 0, 0.03, 4, 1.0, 0.03, 4, 1.0, 7],     # two rows: 7 tokens
            [3, 4, 0, 0.03, 4, 1 / 3, 0.03, 4, 1 / 3, 6],  # one drafting row, two cold ones
            [3, 4, 0, 0.03, 4, 0.0, 0.03, 4, 0.0, 3],      # all cold: no drafting row
            [3, 4, 0, None, 0, None, 0.03, 4, 1.0, 9],     # a switch: not kept
            [3, 4, 50, 0.09, 4, 1.0, 0.09, 4, 1.0, 9],     # prefill
            [5, 2, 0, 0.03, 2, 1.0, 0.03, 2, 1.0, 10],
            [4, 0, 0, 0.01, 0, 1.0, 0.01, 0, 1.0, 4]]      # k = 0
    d = drafting_rows(rows)
    assert d.keys() == {(1, 4), (2, 4), (4, 2)}
    assert d[(1, 4)] == (1, 1.0, 3.0)
    # 2 + 1 drafting rows emitted 7 + (6 - 2) tokens
    assert d[(2, 4)] == (2, pytest.approx(3.0), pytest.approx(11 / 3))
    assert d[(4, 2)] == (1, 5.0, 2.0)


def test_auto_k_trace_refit_prints_the_levels_beside_the_kept_steps_medians(tmp_path, capsys):
    from lvspec_vllm.bench import auto_k_trace

    rows = [[1, 0, 0, None, None, None, 0.006, 0]]
    rows += [[1, 0, 0, 0.006 + 0.001 * (i % 3), 0, 1.0, 0.006, 0] for i in range(20)]
    rows += [[1, 4, 0, None, 0, None, 0.02, 4]]
    rows += [[1, 4, 0, 0.020 + 0.001 * (i % 5), 4, 1.0, 0.02, 4] for i in range(20)]
    rows += [[1, 4, 30, 0.090, 4, 1.0, 0.09, 4]]  # a prefill rode along: not one of the kept
    rows += [[2, 0, 0, 0.015, 0, 1.0, 0.015, 0]] * 20  # batch 2, slower
    r = auto_k_trace.refit(rows, 1)
    assert r["kept_medians_ms"] == {0: pytest.approx(7.0), 4: pytest.approx(22.0)}
    assert r["levels_ms"][0] == pytest.approx(7.0) and r["levels_ms"][4] == pytest.approx(22.0)
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    auto_k_trace.main([str(path), "--fit-at", "1"])
    assert capsys.readouterr().out.startswith("batch 1: fitted step ms by k [7.0, ")


def test_auto_k_cost_prints_microseconds_per_step(capsys):
    from lvspec_vllm.bench import auto_k_cost

    auto_k_cost.main(["--max-batch", "16", "--steps", "40"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 16"]
    assert all(float(line.split()[2]) > 0 for line in lines)


def test_auto_k_cost_times_the_whole_hook_on_a_simulated_engine():
    # the controller settles where the simulated engine says it should: k = 0 where a
    # drafting step costs twice a plain one, k > 0 where drafts are cheap and accepted
    from lvspec_vllm.bench import auto_k_cost
    from lvspec_vllm.patches import scheduler as hook

    real = hook.time
    us, ks, table = auto_k_cost.hook_us_per_step(4, 200, "drafting cannot pay", warmup=600)
    # explorations from k = 0 run k > 0 for 4 steps in 16 (mostly rows that never draft)
    assert us > 0 and table == 0 and ks[0] >= 0.7 * 200
    us, ks, table = auto_k_cost.hook_us_per_step(4, 200, "drafting pays", warmup=600)
    assert us > 0 and table > 0 and ks[0] < 0.2 * 200
    assert hook.time is real  # the hook's clock is given back


def test_step_phases_times_vllms_phases_per_step(tmp_path):
    """The world pair (committed), no speculation against a speculative engine at k = 0: the
    same steps and tokens, each phase's time per step; its k = 0 steps take vLLM's plain path
    (no spec-decode metadata, no drafter call) unless plain_k0_steps is off."""
    out = tmp_path / "phases.json"
    world = "lvspec_vllm/world/checkpoints"
    proc = subprocess.run(
        [sys.executable, "-m", "lvspec_vllm.bench.step_phases", "--target", f"{world}/target",
         "--draft", f"{world}/draft", "--modes", "none,k0,k0-spec-path,auto-cold",
         "--rounds", "1", "--repeat", "1", "--max-tokens", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    none, k0, spec_path = runs["none"][0], runs["k0"][0], runs["k0-spec-path"][0]
    assert none["output_tokens"] == k0["output_tokens"] == spec_path["output_tokens"] == 16 * 6
    assert none["steps"] == k0["steps"] == spec_path["steps"] > 0
    for run in (none, k0, spec_path):
        step = run["seconds"]["EngineCore.step"]
        assert 0 < run["seconds"]["GPUModelRunner._model_forward"] < step <= run["elapsed_s"]
    for phase in ("_calc_spec_decode_metadata", "propose_draft_token_ids",
                  "_copy_draft_token_ids_to_cpu"):
        assert f"GPUModelRunner.{phase}" not in none["seconds"]
        assert f"GPUModelRunner.{phase}" not in k0["seconds"]
        assert spec_path["seconds"][f"GPUModelRunner.{phase}"] > 0
    assert "| GPUModelRunner._model_forward |" in proc.stdout and "| steps |" in proc.stdout
    # none and k = 0 by schedule run at k = 0 throughout (the warm-up's last step too): every
    # timed step is a steady k = 0 step
    for run in (none, k0, spec_path):
        assert run["k0_steps"] == run["steps"] and run["k0_seconds"] == run["seconds"]
        assert "AutoKController.after_step" not in run["seconds"]  # no auto_k here
    assert "| phase, us per steady k = 0 step |" in proc.stdout
    # LVSpec's own phases: the drafter's planning where rows can be cold, auto_k's hook and its
    # parts (a static method among them) where it runs
    assert "LVSpecDrafter.begin_plain_step" not in none["seconds"]
    # a schedule at k = 0 everywhere never drafts: its steps go plain without planning rows
    assert k0["seconds"]["LVSpecDrafter.begin_plain_step"] > 0
    assert "ColdRequests.step" not in k0["seconds"]
    auto = runs["auto-cold"][0]
    assert auto["output_tokens"] == 16 * 6
    for phase in ("AutoKController.positions", "AutoKController.after_step", "AutoK.observe",
                  "AutoK.next_table", "WarmRequests.step", "ColdRequests.step"):
        assert auto["seconds"][phase] > 0, phase
    assert auto["seconds"]["AutoK.observe"] < auto["seconds"]["AutoKController.after_step"]


@pytest.mark.parametrize("one_by_one", [False, True], ids=["blocks", "one-by-one"])
def test_hook_ab_switches_auto_k_inside_one_engine(tmp_path, one_by_one):
    """The world pair (committed): one engine, blocks of requests with auto_k's controller on,
    on without explorations, and detached (the k = 0 engine), each arm's tokens/s over the
    detached block of its turn; with ``--one-by-one`` the arms take turns request by
    request, each request submitted on an idle engine."""
    out = tmp_path / "hook_ab.json"
    world = "lvspec_vllm/world/checkpoints"
    proc = subprocess.run(
        [sys.executable, "-m", "lvspec_vllm.bench.hook_ab", "--target", f"{world}/target",
         "--draft", f"{world}/draft", "--turns", "2", "--requests", "4", "--max-tokens", "6",
         "--out", str(out)] + (["--one-by-one"] if one_by_one else []),
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["one_by_one"] is one_by_one
    blocks = result["blocks"]
    if one_by_one:  # a turn's blocks sum its requests, each arm's in turn
        assert [b["arm"] for b in blocks] == ["auto", "no-explore", "k0"] * 2
    else:  # every arm once a turn, in an order that rotates
        assert [b["arm"] for b in blocks] == ["auto", "no-explore", "k0", "no-explore", "k0",
                                              "auto"]
    assert all(b["output_tokens"] == 4 * 6 for b in blocks)
    for b in blocks:
        assert len(b["gc"]) == 3 and b["gc_s"] >= 0
        if b["arm"] == "k0":  # detached: the controller saw no step
            assert b["controller_s"] == 0 and b["steps_by_k"] == {}
        else:
            assert b["controller_s"] > 0 and sum(b["steps_by_k"].values()) > 0
    for arm in ("auto", "no-explore", "k0"):
        assert f"| {arm} |" in proc.stdout
    assert "| k0 | 1.000x" in proc.stdout


def test_serve_ab_switches_auto_k_inside_one_server(tmp_path):
    """The world pair (committed): one `vllm serve` with auto_k + cold, its hook switched
    between the arms through /collective_rpc before each request, read per arm."""
    world = "lvspec_vllm/world/checkpoints"
    proc = subprocess.run(
        [sys.executable, "-m", "lvspec_vllm.bench.serve_ab", "--target", f"{world}/target",
         "--draft", f"{world}/draft", "--turns", "2", "--requests", "2", "--max-tokens", "6",
         "--warmup-requests", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve_ab.json").read_text())
    assert result["warmup"]["output_tokens"] == 2 * 6
    blocks = result["blocks"]
    assert [b["arm"] for b in blocks] == ["auto", "no-explore", "k0"] * 2
    assert all(b["output_tokens"] == 2 * 6 for b in blocks)
    for b in blocks:
        if b["arm"] == "k0":  # detached: the controller saw no step
            assert b["controller_s"] == 0 and b["steps_by_k"] == {}
        else:
            assert b["controller_s"] > 0 and sum(b["steps_by_k"].values()) > 0
    assert "| k0 | 1.000x" in proc.stdout
    assert "lvspec_hook_arm" in (tmp_path / "serve_ab.log").read_text()  # the extension
