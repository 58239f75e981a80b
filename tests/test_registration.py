"""Plugin registration: entry point, idempotence, version gate, patch registry."""

from importlib.metadata import entry_points

import pytest

import lvspec_vllm
from lvspec_vllm import patches


def test_entry_point_is_found_and_loads_register():
    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "lvspec" in eps
    assert eps["lvspec"].load() is lvspec_vllm.register


def test_vllm_loads_the_plugin_through_its_own_loader():
    from vllm.plugins import load_plugins_by_group

    assert load_plugins_by_group("vllm.general_plugins")["lvspec"] is lvspec_vllm.register


def test_register_twice_changes_nothing():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    lvspec_vllm.register()
    first = (EngineArgs.create_speculative_config, GPUModelRunner.__init__, patches.applied())
    lvspec_vllm.register()
    second = (EngineArgs.create_speculative_config, GPUModelRunner.__init__, patches.applied())
    assert first == second
    assert set(first[2]) == {p.key() for p in patches.all_patches()}
    # the wrapper wraps vLLM's function, not an earlier wrapper
    for patch in patches.all_patches():
        assert not hasattr(patch.original, "__lvspec_patch__")


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "0.3.2", "garbage", "0.320.0"])
def test_unsupported_vllm_version_is_refused(version):
    with pytest.raises(lvspec_vllm.UnsupportedVLLMVersion) as err:
        lvspec_vllm.check_vllm_version(version)
    msg = str(err.value)
    assert version in msg and "0.32.x" in msg and "0.33.x" in msg


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.0", "0.33.2rc1"])
def test_supported_vllm_versions_pass(version):
    lvspec_vllm.check_vllm_version(version)


def test_register_refuses_a_simulated_unsupported_vllm(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.34.1")
    with pytest.raises(lvspec_vllm.UnsupportedVLLMVersion, match="0.34.1"):
        lvspec_vllm.register()


def test_registry_refuses_a_second_patch_of_the_same_attribute():
    from lvspec_vllm.patches.engine_args import CreateSpeculativeConfigPatch

    lvspec_vllm.register()

    class Intruder(patches.Patch):
        target_module = CreateSpeculativeConfigPatch.target_module
        target_owner = CreateSpeculativeConfigPatch.target_owner
        target_attr = CreateSpeculativeConfigPatch.target_attr

    with pytest.raises(RuntimeError, match="already patched by CreateSpeculativeConfigPatch"):
        Intruder.apply()


def _scheduler(lvspec: bool):
    from types import SimpleNamespace

    return SimpleNamespace(vllm_config=SimpleNamespace(
        additional_config={"lvspec": {}} if lvspec else {}), dynamic_sd_lookup=[0, 0])


@pytest.mark.parametrize("lvspec, k, batch_queue, model_executed, fetches", [
    (True, 0, None, True, False),      # nothing was drafted: no round trip
    (True, 4, None, True, True),       # drafts to fetch
    (False, 0, None, True, True),      # another method's engine: vLLM's post_step as it is
    (True, 0, [], True, True),         # a batch queue: the last finished step need not be last
    (True, 0, None, False, True),      # nothing executed: vLLM decides (and does nothing)
])
def test_post_step_fetches_drafts_unless_the_step_drafted_nothing(lvspec, k, batch_queue,
                                                                  model_executed, fetches):
    from types import SimpleNamespace

    from lvspec_vllm.patches.engine_core import EngineCorePostStepPatch
    from lvspec_vllm.patches.scheduler import SchedulerUpdatePatch

    scheduler = _scheduler(lvspec)
    step = SimpleNamespace(num_spec_tokens_to_schedule=k)
    SchedulerUpdatePatch.wrapper(lambda *a: "outputs", scheduler, step, None)
    calls = []
    core = SimpleNamespace(scheduler=scheduler, batch_queue=batch_queue)
    EngineCorePostStepPatch.wrapper(lambda s, executed: calls.append(executed), core,
                                    model_executed)
    assert calls == ([model_executed] if fetches else [])


@pytest.mark.parametrize("has_hook, drafts, async_scheduling, runs_vllm", [
    (True, "empty", False, False),   # the drafter runs no forward this step: inputs unprepared
    (True, None, False, True),       # someone must run (or catch up) the draft: vLLM's path
    (True, "empty", True, True),     # async scheduling: vLLM's path also publishes counts
    (False, None, False, True),      # another method's drafter: vLLM's method as it is
])
def test_propose_skips_vllms_input_preparation_only_when_the_drafter_says(
        has_hook, drafts, async_scheduling, runs_vllm):
    from types import SimpleNamespace

    import numpy as np
    import torch

    from lvspec_vllm.patches.propose import ProposeDraftTokenIdsPatch

    asked = []
    empty = torch.empty(2, 0, dtype=torch.int64)

    def propose_without_inputs(k, batch, query_start_loc, step_ids):
        asked.append((k, batch, query_start_loc, step_ids().tolist()))
        return empty if drafts == "empty" else None

    drafter = SimpleNamespace(propose_without_inputs=propose_without_inputs) if has_hook \
        else SimpleNamespace()
    runner = SimpleNamespace(
        drafter=drafter, use_async_scheduling=async_scheduling,
        input_batch=SimpleNamespace(num_reqs=2),
        query_start_loc=SimpleNamespace(np=np.array([0, 1, 2, 2, 2])),
        input_ids=SimpleNamespace(gpu=torch.tensor([7, 9, 0, 0])))
    step = SimpleNamespace(num_spec_tokens_to_schedule=0, total_num_scheduled_tokens=2)
    out = ProposeDraftTokenIdsPatch.wrapper(lambda *a, **kw: "vllm", runner, step, "sampled")
    assert out == "vllm" if runs_vllm else out is empty
    if has_hook and not async_scheduling:
        assert asked == [(0, 2, [0, 1, 2], [7, 9])]
    else:
        assert asked == []


def test_take_draft_token_ids_empties_only_the_cold_requests_lists():
    from types import SimpleNamespace

    from vllm.v1.outputs import DraftTokenIds

    from lvspec_vllm.patches.drafts import TakeDraftTokenIdsPatch

    def take(runner):
        return DraftTokenIds(["a", "b", "c"], [[1, 2], [3, 4], [5, 6]])

    runner = SimpleNamespace(drafter=SimpleNamespace(cold_request_ids={"b"}))
    out = TakeDraftTokenIdsPatch.wrapper(take, runner)
    assert out.req_ids == ["a", "b", "c"] and out.draft_token_ids == [[1, 2], [], [5, 6]]
    for drafter in (SimpleNamespace(cold_request_ids=set()), SimpleNamespace()):
        out = TakeDraftTokenIdsPatch.wrapper(take, SimpleNamespace(drafter=drafter))
        assert out.draft_token_ids == [[1, 2], [3, 4], [5, 6]]
    assert TakeDraftTokenIdsPatch.wrapper(lambda r: None, runner) is None
