"""Visual relevance inside vLLM against ground truth from HF transformers' eager attention."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def test_plugin_relevance_matches_hf_attention_weights(tiny_models):
    proc = subprocess.run([sys.executable, "-m", "lvspec_vllm.testing.relevance_truth"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    plugin, hf = r["plugin"], r["hf"]
    print(json.dumps(r))
    assert len(plugin) >= 10 and r["visual_tokens"] == 16
    assert all(0.0 < v < 1.0 for v in plugin)
    # float32 on both sides; the remaining gap is discussed in docs/architecture.md
    assert r["max_abs_diff"] < 0.05
    n = len(plugin)
    mp, mh = sum(plugin) / n, sum(hf) / n
    cov = sum((a - mp) * (b - mh) for a, b in zip(plugin, hf))
    var = (sum((a - mp) ** 2 for a in plugin) * sum((b - mh) ** 2 for b in hf)) ** 0.5
    assert cov / var > 0.9, "the plugin's v_j does not follow the model's attention"
