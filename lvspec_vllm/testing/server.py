"""Start ``vllm serve`` on 127.0.0.1 for the demo and the serving tests, and stop it after."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SERVED_NAME = "lvspec-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    def metrics(self) -> dict[str, float]:
        """Unlabelled-sum of every sample in /metrics, keyed by metric name."""
        text = urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def vllm_server(model: str, speculative_config: dict | None = None, extra_args: list[str] = (),
                log_path: str | os.PathLike = "vllm-serve.log", timeout: float = 300.0,
                env: dict | None = None) -> Iterator[Server]:
    port = free_port()
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED_NAME, "--dtype", "bfloat16", "--max-model-len", "2048",
           "--max-num-seqs", "8", "--enforce-eager", "--seed", "0",
           "--limit-mm-per-prompt", json.dumps({"video": 1, "image": 1})]
    if speculative_config is not None:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    cmd += list(extra_args)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode} before it was "
                                   f"ready; last log lines:\n{server.log()[-3000:]}")
            try:
                if urllib.request.urlopen(f"{server.base_url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s; see {log_path}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def video_message(mp4_path: str, text: str) -> list[dict]:
    """An OpenAI chat message carrying a base64 mp4 as a ``video_url`` data URL."""
    import base64

    b64 = base64.b64encode(Path(mp4_path).read_bytes()).decode()
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64}"}},
        {"type": "text", "text": text}]}]
