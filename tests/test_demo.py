"""The README's demo: the trained pair served with LVSpec captions a held-out video correctly."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def test_demo_captions_a_held_out_video_through_the_server():
    out = subprocess.run([sys.executable, "-m", "lvspec_vllm.demo", "--scene", "0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)
    right, total = map(int, re.search(r"facts stated correctly: (\d+) of (\d+)",
                                      out.stdout).groups())
    assert total >= 4 and right >= 0.8 * total
    drafts = float(re.search(r"spec decode: drafts=(\d+)", out.stdout).group(1))
    accepted = float(re.search(r"accepted=(\d+)", out.stdout).group(1))
    assert drafts > 0 and accepted > 0  # the video-aware draft was used and agreed


def test_world_demo_preset_names_the_packaged_draft():
    from lvspec_vllm.config import load_preset
    from lvspec_vllm.world import checkpoints_dir

    spec = load_preset("world-demo")
    assert spec["model"] == str(checkpoints_dir() / "draft")
    for role in ("target", "draft", "text_draft"):
        assert (checkpoints_dir() / role / "model.safetensors").exists()
