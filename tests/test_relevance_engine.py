"""Visual relevance inside vLLM against ground truth from HF transformers' eager attention."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("chunk", [None, 8])
def test_plugin_relevance_matches_hf_attention_weights(tiny_models, chunk):
    """chunk=8: the 31-token prompt and its 16 video tokens are prefilled over several steps;
    the keys captured chunk by chunk must give the same masses."""
    args = ["--max-num-batched-tokens", str(chunk)] if chunk else []
    proc = subprocess.run([sys.executable, "-m", "lvspec_vllm.testing.relevance_truth", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    plugin, hf = r["plugin"], r["hf"]
    print(json.dumps(r))
    assert len(plugin) >= 10 and r["visual_tokens"] == 16
    assert (r["prefill_steps"] > 1) == (chunk is not None), r["prefill_steps"]
    assert all(0.0 < v < 1.0 for v in plugin)
    # float32 on both sides, the same positions (docs/architecture.md): equal up to rounding
    assert r["max_abs_diff"] < 1e-4
    n = len(plugin)
    mp, mh = sum(plugin) / n, sum(hf) / n
    cov = sum((a - mp) * (b - mh) for a, b in zip(plugin, hf))
    var = (sum((a - mp) ** 2 for a in plugin) * sum((b - mh) ** 2 for b in hf)) ** 0.5
    assert cov / var > 0.9, "the plugin's v_j does not follow the model's attention"
