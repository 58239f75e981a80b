import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    from lvspec_vllm.testing.tiny_models import ensure_tiny_models

    return ensure_tiny_models()


def run_generate(tmp_path: Path, name: str, *args: str, timeout: float = 600) -> dict:
    """Run lvspec_vllm.testing.generate in its own process (one engine per process)."""
    out = tmp_path / f"{name}.json"
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lvspec_vllm.testing.generate",
                               "--out", str(out), *args],
                              stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"generate {args} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    result["log"] = log.read_text()
    return result
