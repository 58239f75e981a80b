"""LVSpec counters: worker snapshot file -> collector in the API process -> Prometheus text."""

import time

import torch
from prometheus_client import CollectorRegistry, generate_latest

from lvspec_vllm.metrics import LVSpecCollector, MetricsPublisher
from lvspec_vllm.sampler import COUNTERS


def test_published_counts_reach_prometheus_text(tmp_path):
    counts = torch.arange(1, len(COUNTERS) + 1, dtype=torch.int64)
    pub = MetricsPublisher(COUNTERS, str(tmp_path))
    pub.publish(counts)
    registry = CollectorRegistry()
    registry.register(LVSpecCollector(str(tmp_path)))
    deadline = time.time() + 5
    while "lvspec:verify_steps_total 1.0" not in (text := generate_latest(registry).decode()) \
            or "lvspec:draft_tokens_total 2.0" not in text:
        assert time.time() < deadline, text
        time.sleep(0.1)
    pub.close()
    value = dict(zip(COUNTERS, counts.tolist()))
    assert f'lvspec:accepted_tokens_total{{rule="plausible"}} {float(value["plausible"])}' in text
    assert f'lvspec:rejections_total{{reason="guard"}} {float(value["rejected_guard"])}' in text
    assert f'lvspec:rejections_total{{reason="standard"}} {float(value["rejected_standard"])}' \
        in text


def test_the_publishers_thread_reads_the_gauges(tmp_path):
    # the step only copies the counters; the gauges are read when the thread writes
    state = {"live_request_states": 3}
    pub = MetricsPublisher(COUNTERS, str(tmp_path), gauges=lambda: dict(state))
    pub.publish(torch.zeros(len(COUNTERS), dtype=torch.int64))
    registry = CollectorRegistry()
    registry.register(LVSpecCollector(str(tmp_path)))
    for expected in (3, 0):
        state["live_request_states"] = expected
        deadline = time.time() + 5
        while f"lvspec:live_request_states {float(expected)}" not in \
                (text := generate_latest(registry).decode()):
            assert time.time() < deadline, text
            time.sleep(0.1)
    pub.close()


def test_collector_sums_engines_and_survives_a_torn_file(tmp_path):
    (tmp_path / "engine-1.json").write_text('{"verify_steps": 2, "exact": 5}')
    (tmp_path / "engine-2.json").write_text('{"verify_steps": 3, "exact": 1}')
    (tmp_path / "engine-3.json").write_text('{"verify_st')  # mid-write
    registry = CollectorRegistry()
    registry.register(LVSpecCollector(str(tmp_path)))
    text = generate_latest(registry).decode()
    assert "lvspec:verify_steps_total 5.0" in text
    assert 'lvspec:accepted_tokens_total{rule="exact"} 6.0' in text


def test_auto_k_snapshot_reaches_prometheus_text(tmp_path):
    (tmp_path / "core-1.json").write_text(
        '{"auto_k_steps_0": 3, "auto_k_steps_4": 9, "auto_k_last": 4, '
        '"auto_k_elapsed_seconds": 8.0, "auto_k_overspent_seconds": 0.2, '
        '"auto_k_draft_passes": 12, "auto_k_draft_prompt_token_seconds": 3e-05, '
        '"auto_k_running": 4, "auto_k_warm": 1}')
    registry = CollectorRegistry()
    registry.register(LVSpecCollector(str(tmp_path)))
    text = generate_latest(registry).decode()
    assert 'lvspec:auto_k_steps_total{k="4"} 9.0' in text
    assert "lvspec:auto_k 4.0" in text
    assert "lvspec:auto_k_exploration_cost_ratio 0.025" in text
    assert "lvspec:auto_k_draft_passes_total 12.0" in text
    assert "lvspec:auto_k_draft_prompt_token_seconds 3e-05" in text
    assert "lvspec:auto_k_warm_share 0.25" in text
    (tmp_path / "core-1.json").write_text('{"auto_k_steps_0": 3, "auto_k_last": 0}')
    text = generate_latest(registry).decode()
    assert "auto_k_draft" not in text and "warm_share" not in text  # no cold requests
