"""LVSpec's counters on vLLM's ``/metrics``.

The verifier counts in the worker (``LVSpecRejectionSampler.counts``, on the device); vLLM's
Prometheus registry lives in the API process, and vLLM has no channel for a plugin's numbers
between the two. So the first TP rank's worker publishes a snapshot file, and a collector in the
API process reads it at every scrape:

    worker:  counts --(non-blocking copy, each step)--> pinned host buffer
             background thread, every 0.5 s: read the gauges, write <dir>/engine-<pid>.json
             atomically
    API:     LVSpecCollector.collect() sums the files -> lvspec:* counters

The verify path never waits for the host. ``<dir>`` is created by the API process when it
accepts an "lvspec" config and reaches the workers in ``LVSPEC_METRICS_DIR`` (they inherit the
environment; under Ray the variable is added to ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY``; the first TP
rank publishes, so the counters need that rank on the API server's node, as vLLM places it).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

ENV = "LVSPEC_METRICS_DIR"
_RAY_COPY = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
PUBLISH_INTERVAL_S = 0.5

# counter slot -> (metric, label value); slots are lvspec_vllm.sampler.COUNTERS
METRICS = {
    "lvspec:verify_steps": ("Verify steps run by the LVSpec rejection sampler.", None, None),
    "lvspec:draft_tokens": ("Draft tokens verified by LVSpec.", None, None),
    "lvspec:accepted_tokens": ("Draft tokens accepted, by the rule that accepted them.", "rule",
                               ("exact", "plausible", "semantic", "shifted")),
    "lvspec:rejections": ("Requests whose draft was cut short, by reason.", "reason",
                          ("anchor", "guard", "no_rule", "budget", "entropy", "strict",
                           "standard")),
}


# gauges: the plugin's per-request state, which must return to empty as requests leave
GAUGES = {
    "lvspec:live_request_states": "Requests with LVSpec verification state (codebook, history).",
    "lvspec:captured_key_bytes": "Bytes of target keys held for the visual relevance.",
    "lvspec:draft_encoder_cache_bytes": "Bytes of the video-aware draft's own encoder outputs.",
}

# the video-aware draft's own counts, cumulative (published beside the gauges)
DRAFT_COUNTERS = {
    "lvspec:draft_visual_tokens": "Image and video tokens the video-aware draft processed.",
    "lvspec:draft_pruned_visual_tokens": "Video tokens draft_pruning withheld from the draft.",
    "lvspec:draft_seconds": "Time the draft model spent proposing (its vision encoder and "
                            "forward passes), seconds.",
    "lvspec:draft_skipped_steps": "Steps in which the draft ran no forward at all (k = 0, or "
                                  "every row cold).",
    "lvspec:draft_plain_steps": "Steps that verified and drafted nothing and took vLLM's plain "
                                "path, as without speculation (plain_k0_steps).",
    "lvspec:draft_plain_cold_steps": "Of those, steps at k > 0 whose rows were all cold "
                                     "(draft_cold_requests).",
    "lvspec:draft_deferred_tokens": "Tokens whose draft pass waited at k = 0 (draft_catch_up).",
    "lvspec:draft_caught_up_tokens": "Deferred tokens the draft processed when it next ran.",
    "lvspec:draft_cold_requests": "Requests the draft never ran for (draft_cold_requests): "
                                  "admitted at k = 0, or reusing a cached prefix of one.",
}


def _slot(metric: str, label: str | None) -> str:
    if metric == "lvspec:verify_steps":
        return "verify_steps"
    if metric == "lvspec:draft_tokens":
        return "draft_tokens"
    return label if metric == "lvspec:accepted_tokens" else f"rejected_{label}"


class MetricsPublisher:
    """Worker side: mirror the device counters to a file without blocking the verify path.

    A step only copies the counters (``publish``, non-blocking); the gauges, host-side sums
    over the plugin's state, are read by the publisher's thread when it writes (``gauges``),
    not by every step (they are Python sums over per-request state; the step loop runs every
    decode step)."""

    def __init__(self, names: tuple[str, ...], directory: str,
                 gauges: Callable[[], dict[str, int | float]] | None = None):
        self.names = names
        self._read_gauges = gauges
        self._gauges: dict[str, int | float] = {}
        self.path = Path(directory) / f"engine-{os.getpid()}.json"
        self._host = torch.zeros(len(names), dtype=torch.int64,
                                 pin_memory=torch.cuda.is_available())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lvspec-metrics", daemon=True)
        self._thread.start()

    def publish(self, counts: torch.Tensor) -> None:
        self._host.copy_(counts, non_blocking=True)

    def _run(self) -> None:
        last = None
        while not self._stop.wait(PUBLISH_INTERVAL_S):
            if self._read_gauges is not None:
                try:
                    self._gauges = dict(self._read_gauges())
                except RuntimeError:  # a dict the step was changing: the next round reads it
                    pass
            snapshot = {**dict(zip(self.names, self._host.tolist())), **self._gauges}
            if snapshot != last:
                tmp = self.path.with_suffix(".tmp")
                try:
                    tmp.write_text(json.dumps(snapshot))
                    tmp.replace(self.path)
                except OSError:
                    return  # the API process is gone and removed the directory
                last = snapshot

    def close(self) -> None:
        self._stop.set()


class LVSpecCollector:
    """API side: a Prometheus collector summing every engine's snapshot in ``directory``."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def _totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for f in self.directory.glob("*.json"):
            try:
                for k, v in json.loads(f.read_text()).items():
                    totals[k] = totals.get(k, 0) + v
            except (OSError, ValueError):
                continue  # a file being replaced: the next scrape reads it
        return totals

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = self._totals()
        for metric, doc in GAUGES.items():
            yield GaugeMetricFamily(metric, doc, value=totals.get(metric.split(":")[1], 0))
        for metric, doc in DRAFT_COUNTERS.items():
            yield CounterMetricFamily(metric, doc, value=totals.get(metric.split(":")[1], 0))
        # auto_k: steps per chosen k, written by the engine core's scheduler
        steps = {key.removeprefix("auto_k_steps_"): v for key, v in totals.items()
                 if key.startswith("auto_k_steps_")}
        if steps:
            family = CounterMetricFamily("lvspec:auto_k_steps", "Engine steps by the k that "
                                         "auto_k chose.", labels=["k"])
            for k in sorted(steps, key=int):
                family.add_metric([k], steps[k])
            yield family
            yield GaugeMetricFamily("lvspec:auto_k", "k of the latest step under auto_k.",
                                    value=totals.get("auto_k_last", 0))
            # decayed seconds summed over engines, so the share is of all of them
            elapsed = totals.get("auto_k_elapsed_seconds", 0)
            yield GaugeMetricFamily(
                "lvspec:auto_k_exploration_cost_ratio", "What auto_k's explorations cost beyond "
                "the chosen k, as a share of the engine's recent time (capped by its budget).",
                value=totals.get("auto_k_overspent_seconds", 0) / elapsed if elapsed else 0)
        if "auto_k_draft_passes" in totals:  # draft_cold_requests: the drafter's own clock
            yield CounterMetricFamily("lvspec:auto_k_draft_passes", "Draft passes timed by the "
                                      "drafter that reached auto_k.",
                                      value=totals["auto_k_draft_passes"])
            yield GaugeMetricFamily("lvspec:auto_k_draft_prompt_token_seconds", "What a prompt "
                                    "token costs the draft, as auto_k prices it (0: not yet "
                                    "measured).",
                                    value=totals.get("auto_k_draft_prompt_token_seconds", 0))
        if "auto_k_running" in totals:  # draft_cold_requests: the share k is chosen at
            running = totals["auto_k_running"]
            yield GaugeMetricFamily("lvspec:auto_k_warm_share", "Of the requests the latest "
                                    "step left running, the share that would draft (not cold); "
                                    "auto_k prices its k at it.",
                                    value=totals.get("auto_k_warm", 0) / running if running
                                    else 1.0)
        for metric, (doc, label, values) in METRICS.items():
            family = CounterMetricFamily(metric, doc, labels=[label] if label else None)
            if label is None:
                family.add_metric([], totals.get(_slot(metric, None), 0))
            else:
                for value in values:
                    family.add_metric([value], totals.get(_slot(metric, value), 0))
            yield family


_collector: LVSpecCollector | None = None


def install_collector() -> str:
    """In the API process: create the snapshot directory and register the collector, once."""
    global _collector
    if _collector is None:
        directory = tempfile.mkdtemp(prefix="lvspec-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ[ENV] = directory
        # Ray copies only some variables to its workers; this one is asked for by name.
        extra = [v for v in os.environ.get(_RAY_COPY, "").split(",") if v.strip()]
        if ENV not in extra:
            os.environ[_RAY_COPY] = ",".join([*extra, ENV])
        from prometheus_client import REGISTRY

        _collector = LVSpecCollector(directory)
        REGISTRY.register(_collector)
    return str(_collector.directory)
