import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _import_kernels_interpreted() -> None:
    """Import the Triton kernels under TRITON_INTERPRET=1 (CPU tensors, no GPU), then restore the
    variable so the vLLM engines these tests start do not see it. Triton binds interpreter mode
    when it is first imported and when @triton.jit decorates, so this must run before anything
    imports triton: conftest is imported before every test module."""
    import importlib

    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/conftest.py; the kernel tests "
                           "need it imported under TRITON_INTERPRET=1")
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


KERNEL_MODULES = ["lvspec_vllm.kernels.verify_prefix", "lvspec_vllm.kernels.visual_mass"]
_import_kernels_interpreted()


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


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, tiny_models):
    """Engine runs computed lazily and shared by the tests of one module: runs(name, *args)."""
    cache = {}
    tmp = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])

    def get(name, *args):
        if name not in cache:
            cache[name] = run_generate(tmp, name, *args)
        return cache[name]
    return get


def assert_same_tokens(reference: dict, candidate: dict) -> None:
    """Two generate runs emitted the same tokens for every request."""
    assert len(reference["outputs"]) == len(candidate["outputs"])
    for i, (ref, out) in enumerate(zip(reference["outputs"], candidate["outputs"])):
        assert out == ref, f"request {i}: first difference at token " \
                           f"{next(j for j, (a, b) in enumerate(zip(ref, out)) if a != b)}"
