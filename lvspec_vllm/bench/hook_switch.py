"""Switch ``auto_k``'s scheduler hook between arms in a running engine.

The arms (``hook_ab``, ``serve_ab``):

- ``auto``: the controller as it ships;
- ``no-explore``: the same with its explorations off (a negative budget: none starts at a load
  where a step was timed, and a warm-up timed them);
- ``k0``: the hook detached and vLLM's k table at 0: the k = 0 engine with cold requests
  (``lvspec-schedule-cold``), in the same process, caches and memory layout.

The switch goes through the plugin's own attributes (``patches/scheduler.py``), which only
these benchmarks touch and a user's engine never does. In a server, ``HookSwitch`` is a vLLM
worker extension (``--worker-extension-cls``) whose method the server's ``/collective_rpc``
calls (``VLLM_SERVER_DEV_MODE=1``). The engine core runs it on its step loop's thread,
between two steps. It reaches the scheduler only where the worker shares its process, which is the
case with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the model in the engine core's process).
"""

from __future__ import annotations

ARMS = ("auto", "no-explore", "k0")


def switch(scheduler, controller, arm: str, budget: float) -> None:
    """Set the next requests' arm: the controller attached (its budget as shipped, or
    negative: no exploration starts), or detached with vLLM's k table at 0."""
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}: expected one of {', '.join(ARMS)}")
    if arm == "k0":
        scheduler.__dict__["_lvspec_auto_k"] = None
        scheduler.dynamic_sd_lookup[1:] = [0] * (len(scheduler.dynamic_sd_lookup) - 1)
        return
    controller.auto.explore_budget = budget if arm == "auto" else -1.0
    scheduler.__dict__["_lvspec_auto_k"] = controller
    controller.last_end = None  # the detached requests' time is no step of the controller's
    controller._applied = None  # rewrite vLLM's lookup from the controller's table
    controller._apply(scheduler, controller.auto.table)


class HookSwitch:
    """vLLM worker extension: ``/collective_rpc`` with ``{"method": "lvspec_hook_arm",
    "args": [ARM]}`` switches the arm and returns the controller's counters at the switch
    (its own seconds and steps per k so far), from which a client takes each arm's share."""

    def lvspec_hook_arm(self, arm: str) -> dict:
        state = self.__dict__.get("_lvspec_hook")
        if state is None:
            from lvspec_vllm.patches.scheduler import auto_k_schedulers

            found = auto_k_schedulers()
            if len(found) != 1:
                raise RuntimeError(
                    f"lvspec_hook_arm: {len(found)} schedulers with auto_k in this process, "
                    "expected 1 (start the server with \"auto_k\": true, "
                    "VLLM_ENABLE_V1_MULTIPROCESSING=0, and after a first request)")
            scheduler = found[0]
            controller = scheduler.__dict__["_lvspec_auto_k"]
            state = self.__dict__["_lvspec_hook"] = (scheduler, controller,
                                                     controller.auto.explore_budget)
        scheduler, controller, budget = state
        switch(scheduler, controller, arm, budget)
        return {"arm": arm, "controller_s": controller.own_seconds,
                "steps_by_k": {str(k): n for k, n in controller.steps_by_k.items()}}
