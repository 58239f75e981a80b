"""lvspec-bench project: the roofline cost model and the speedup it projects (pure)."""

import pytest

from lvspec_vllm.bench import projection as pj

H100 = pj.GPUS["h100-sxm"]


def _setting(**kw):
    return pj.Setting(H100, pj.QWEN25VL_32B, pj.QWEN25VL_7B, **kw)


def test_memory_bound_step_is_weights_and_kv_over_bandwidth():
    s = _setting(weight_bytes=1.0, context=0)
    bw = H100.bandwidth * s.eta_mem
    assert s.step_time(1, 0) == pytest.approx(pj.QWEN25VL_32B.params_read / bw)
    # k draft forwards of the draft's weights; verifying 5 rows costs what 1 row does
    assert s.step_time(1, 4) == pytest.approx(
        (pj.QWEN25VL_32B.params_read + 4 * pj.QWEN25VL_7B.params_read) / bw)
    ctx = _setting(weight_bytes=1.0, context=4096)
    assert ctx.step_time(2, 0) == pytest.approx(
        (pj.QWEN25VL_32B.params_read + 2 * 4096 * pj.QWEN25VL_32B.kv_bytes_per_token) / bw)


@pytest.mark.parametrize("p", [[0.9, 0.8, 0.7, 0.6], [0.5, 0.3, 0.2, 0.1], [0.99] * 4])
def test_batch_one_speedup_is_tokens_per_step_over_relative_step_cost(p):
    s = _setting(context=0)
    r = pj.QWEN25VL_7B.params_read / pj.QWEN25VL_32B.params_read
    for k in range(5):
        assert pj.speedup(s, p, 1, k) == pytest.approx((1 + sum(p[:k])) / (1 + k * r))


def test_no_acceptance_means_no_speculation():
    s = _setting()
    for b in (1, 4, 8):
        assert pj.best_k(s, [0.0] * 4, b) == (0, 1.0)


def test_compute_bound_verify_makes_long_drafts_lose():
    """A GPU with little compute: verifying k+1 rows costs k+1 times one row, the draft's
    passes come on top, so even good acceptance does not pay."""
    weak = pj.GPU("weak", 80e9, 3.35e12, 1e12, 1e12)
    s = pj.Setting(weak, pj.QWEN25VL_32B, pj.QWEN25VL_7B, context=1024)
    p = [0.8, 0.7, 0.6, 0.5]
    assert pj.best_k(s, p, 8)[0] == 0
    assert pj.speedup(s, p, 8, 4) < 1
    # the same acceptance on the H100 at batch 1 pays with the longest draft
    assert pj.best_k(_setting(context=1024), p, 1)[0] == 4


def test_memory_check_and_what_it_reports():
    assert _setting(weight_bytes=2.0).max_batch() == 0  # 32B + 7B in bf16: 84 GB
    s = _setting(weight_bytes=1.0, context=8192)
    n = s.max_batch()
    assert s.fits(n) and not s.fits(n + 1) and n >= 1
    md = pj.table(s, {"run": [0.7, 0.5, 0.4, 0.3]}, [1, n + 1])
    assert "does not fit" in md and f"at most {n} such requests fit" in md


def test_acceptance_is_read_per_position_from_a_run():
    run = {"mode": "strict", "metrics": {"vllm:spec_decode_num_drafts": 10,
                                         "vllm:spec_decode_num_accepted_tokens_per_pos":
                                             [8, 6, 3, 1]}}
    p = pj.acceptance_from_run(run)
    assert p == [0.8, 0.6, 0.3, 0.1]
    assert pj.expected_tokens(p, 2) == pytest.approx(2.4)
    with pytest.raises(ValueError, match="k <= 4"):
        pj.expected_tokens(p, 5)
    with pytest.raises(ValueError, match="per-position"):
        pj.acceptance_from_run({"mode": "none", "metrics": {}})


def test_cli_prints_the_table_for_measured_runs(tmp_path, capsys):
    import json

    from lvspec_vllm.bench.cli import main

    path = tmp_path / "run-strict.json"
    path.write_text(json.dumps({"mode": "strict", "metrics": {
        "vllm:spec_decode_num_drafts": 4, "vllm:spec_decode_num_accepted_tokens_per_pos":
            [4, 3, 2, 1]}}))
    main(["project", str(path), "--label", "measured", "--concurrency", "1,2",
          "--context", "2048"])
    out = capsys.readouterr().out
    # the fourth position adds 0.25 tokens for a fifth of a target step: k = 3 is best
    assert "| measured | 3.50 | k = 3: 1.95x (1.86x) |" in out and "context 2048 tokens" in out
