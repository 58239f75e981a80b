"""LVSpec options: validation messages, translation to vLLM's draft_model, presets."""

import json

import pytest

from lvspec_vllm.config import LVSpecConfig, LVSpecConfigError, load_preset, preset_names
from lvspec_vllm.patches.engine_args import translate

BASE = {"method": "lvspec", "model": "draft", "num_speculative_tokens": 4}


def test_defaults_are_strict():
    cfg = LVSpecConfig.from_dict({})
    assert cfg.loose is False and cfg.describe() == "strict (lossless)"


def test_round_trip_through_additional_config_json():
    cfg = LVSpecConfig.from_dict({"relevance_threshold": 0.4, "shift_window": 3,
                                  "relevance_layers": [0.5, -1], "entropy_gate": None})
    again = LVSpecConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.relevance_layers == (0.5, -1)


@pytest.mark.parametrize("key, value, fragment", [
    ("relevance_threshold", 1.5, "'relevance_threshold'=1.5 is out of range; allowed: [0.0, 1.0]"),
    ("relevance_threshold", -0.1, "allowed: [0.0, 1.0]"),
    ("plausibility_ratio", 0.0, "allowed: (0.0, 1.0]"),
    ("shift_window", 0, "'shift_window'=0 is out of range; allowed: [1, 8]"),
    ("shift_window", 9, "allowed: [1, 8]"),
    ("plausibility_top_k", 2.5, "'plausibility_top_k' must be an integer, got 2.5"),
    ("shift_window", True, "'shift_window' must be an integer"),
    ("semantic_threshold", "high", "'semantic_threshold' must be a number, got 'high'"),
    ("codebook", "yes", "'codebook' must be true or false, got 'yes'"),
    ("relevance_mode", "adaptive", "'relevance_mode' must be one of 'absolute', 'relative'"),
    ("relevance_layers", [], "needs at least one layer"),
    ("relevance_layers", [1.5], "entry 1.5 is invalid"),
    ("relevance_layers", "middle", "must be a list"),
    ("guard_words", ["not", 3], "list of non-empty strings"),
    ("relevance_threshold", None, "'relevance_threshold' may not be null"),
    ("max_loose_per_step", -1, "allowed: [0, 64]"),
])
def test_bad_values_name_key_value_and_range(key, value, fragment):
    with pytest.raises(LVSpecConfigError) as err:
        LVSpecConfig.from_dict({key: value})
    assert fragment in str(err.value)


def test_unknown_key_is_named_and_allowed_keys_listed():
    with pytest.raises(LVSpecConfigError) as err:
        translate({**BASE, "relevance_treshold": 0.3})
    msg = str(err.value)
    assert "'relevance_treshold'" in msg and "relevance_threshold" in msg
    assert "num_speculative_tokens" in msg  # vLLM's keys are listed too


def test_auto_k_sets_vllms_k_table_and_refuses_a_fixed_schedule():
    spec, cfg = translate({**BASE, "auto_k": True})
    assert cfg.auto_k
    (entry,) = spec["num_speculative_tokens_per_batch_size"]
    assert entry[0] == 1 and entry[2] == BASE["num_speculative_tokens"]
    with pytest.raises(LVSpecConfigError, match="remove \"num_speculative_tokens_per_batch_size"):
        translate({**BASE, "auto_k": True, "num_speculative_tokens_per_batch_size": [[1, 8, 2]]})
    spec, _ = translate({**BASE, "num_speculative_tokens_per_batch_size": [[1, 8, 2]]})
    assert spec["num_speculative_tokens_per_batch_size"] == [[1, 8, 2]]  # passed to vLLM as is


@pytest.mark.parametrize("options, accepted", [
    ({"auto_k": True}, True),
    ({"num_speculative_tokens_per_batch_size": [[1, 4, 4], [5, 64, 0]]}, True),
    ({"num_speculative_tokens_per_batch_size": [[1, 64, 2]]}, False),  # never k = 0
    ({}, False),
    ({"auto_k": True, "draft_catch_up": False}, False),
])
def test_cold_requests_need_k0_steps_and_catch_up(options, accepted):
    opts = {**BASE, **options, "draft_cold_requests": True}
    if accepted:
        _, cfg = translate(opts)
        assert cfg.draft_cold_requests
        return
    with pytest.raises(LVSpecConfigError, match="'draft_cold_requests'") as err:
        translate(opts)
    assert "'draft_cold_requests': false" in str(err.value) or "draft_catch_up" in str(err.value)


def test_loose_modes_describe_their_rules():
    _, cfg = translate({**BASE, "loose": True, "shift": False})
    assert cfg.needs_relevance() and cfg.describe() == "loose (plausibility, semantic)"
    _, cfg = translate({**BASE, "loose": True, "anchor_identification": False})
    assert not cfg.needs_relevance()


@pytest.mark.parametrize("spec, fragment", [
    ({"method": "lvspec", "num_speculative_tokens": 4}, "needs a draft model"),
    ({"method": "lvspec", "model": "d"}, "needs \"num_speculative_tokens\""),
    ({**BASE, "num_speculative_tokens": 0}, "integer in [1, 32], got 0"),
    ({**BASE, "num_speculative_tokens": "8"}, "got '8'"),
])
def test_missing_or_bad_vllm_side_keys(spec, fragment):
    with pytest.raises(LVSpecConfigError) as err:
        translate(spec)
    assert fragment in str(err.value)


def test_translation_splits_lvspec_keys_and_keeps_vllm_keys():
    vllm_spec, cfg = translate({**BASE, "draft-tensor-parallel-size": 1, "shift_window": 3})
    assert vllm_spec == {"method": "draft_model", "model": "draft", "num_speculative_tokens": 4,
                         "draft_tensor_parallel_size": 1}
    assert cfg.shift_window == 3


def test_other_methods_are_left_alone():
    assert translate({"method": "ngram", "num_speculative_tokens": 3}) is None
    assert translate({}) is None


def test_cli_shorthands_count():
    vllm_spec, _ = translate({}, spec_method="lvspec", spec_model="d", spec_tokens=2)
    assert "method" not in vllm_spec  # vLLM merges --spec-method itself (rewritten by the patch)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_lvspec_config(name):
    preset = load_preset(name)
    assert preset["method"] == "lvspec"
    assert translate(preset) is not None


def test_unknown_preset_lists_presets():
    with pytest.raises(LVSpecConfigError, match="tiny-demo"):
        load_preset("nope")


def test_preset_cli_prints_a_speculative_config(capsys):
    from lvspec_vllm.config import preset_main

    preset_main(["qwen2.5-vl-32b-text-draft", "num_speculative_tokens=5", "shift_window=2"])
    out = json.loads(capsys.readouterr().out)
    assert out["num_speculative_tokens"] == 5 and out["model"] == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(LVSpecConfigError, match="shift_window"):
        preset_main(["tiny-demo", "shift_window=99"])
    # a misspelt key is caught here too, not only when vLLM starts
    with pytest.raises(LVSpecConfigError, match="unknown speculative_config key 'shift_windw'"):
        preset_main(["tiny-demo", "shift_windw=2"])


# -- through vLLM's own EngineArgs: what `vllm serve` and `vllm.LLM` run at startup -------------

def _engine_config(tiny_models, spec, **kw):
    import lvspec_vllm
    from vllm.engine.arg_utils import EngineArgs

    lvspec_vllm.register()
    args = EngineArgs(model=str(tiny_models / "qwen25vl"), speculative_config=spec,
                      max_model_len=2048, enforce_eager=True, **kw)
    return args.create_engine_config()


def test_engine_args_translate_lvspec(tiny_models, monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 3, "relevance_threshold": 0.4}
    cfg = _engine_config(tiny_models, spec)
    assert cfg.speculative_config.method == "draft_model"
    assert cfg.speculative_config.num_speculative_tokens == 3
    assert cfg.additional_config["lvspec"]["relevance_threshold"] == 0.4
    assert not cfg.use_v2_model_runner


def test_engine_args_cli_shorthands(tiny_models):
    import lvspec_vllm
    from vllm.engine.arg_utils import EngineArgs

    lvspec_vllm.register()
    args = EngineArgs(model=str(tiny_models / "qwen25vl"), max_model_len=2048,
                      enforce_eager=True, spec_method="lvspec",
                      spec_model=str(tiny_models / "qwen25vl_aligned"), spec_tokens=2)
    cfg = args.create_engine_config()
    assert cfg.speculative_config.method == "draft_model"
    assert "lvspec" in cfg.additional_config


@pytest.mark.parametrize("extra, fragment", [
    ({"shift_window": 99}, "'shift_window'=99 is out of range"),
    ({"bogus": 1}, "unknown speculative_config key 'bogus'"),
])
def test_engine_args_refuse_bad_options_at_startup(tiny_models, extra, fragment):
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 3, **extra}
    with pytest.raises(LVSpecConfigError) as err:
        _engine_config(tiny_models, spec)
    assert fragment in str(err.value)


def test_engine_args_accept_a_same_family_vision_language_draft(tiny_models):
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_draft"),
            "num_speculative_tokens": 3}
    config = _engine_config(tiny_models, spec)
    assert config.speculative_config.draft_model_config.is_multimodal_model


def test_engine_args_refuse_a_vision_language_draft_of_another_family(tiny_models):
    spec = {"method": "lvspec", "model": str(tiny_models / "llava_ov_draft"),
            "num_speculative_tokens": 3}
    with pytest.raises(LVSpecConfigError) as err:
        _engine_config(tiny_models, spec)
    assert "LlavaOnevisionForConditionalGeneration but the target is a " \
           "Qwen2_5_VLForConditionalGeneration" in str(err.value)


def test_engine_args_refuse_a_draft_that_would_see_other_visual_tokens(tiny_models, tmp_path):
    import json
    import shutil

    draft = tmp_path / "other_merge"
    shutil.copytree(tiny_models / "qwen25vl_draft", draft)
    cfg = json.loads((draft / "config.json").read_text())
    cfg["vision_config"]["spatial_merge_size"] = 1
    (draft / "config.json").write_text(json.dumps(cfg))
    spec = {"method": "lvspec", "model": str(draft), "num_speculative_tokens": 3}
    with pytest.raises(LVSpecConfigError) as err:
        _engine_config(tiny_models, spec)
    assert "vision_config.spatial_merge_size (draft 1, target 2)" in str(err.value)


def test_engine_args_refuse_draft_with_another_vocabulary(tiny_models, tmp_path):
    import json
    import shutil

    draft = tmp_path / "other_vocab"
    shutil.copytree(tiny_models / "qwen25vl_aligned", draft)
    cfg = json.loads((draft / "config.json").read_text())
    cfg["vocab_size"] = 4096
    (draft / "config.json").write_text(json.dumps(cfg))
    spec = {"method": "lvspec", "model": str(draft), "num_speculative_tokens": 3}
    with pytest.raises(Exception) as err:
        _engine_config(tiny_models, spec)
    # vLLM's own check, before any weight is loaded: both sizes are named
    assert "vocab" in str(err.value) and "4096" in str(err.value) and "2048" in str(err.value)


def test_engine_args_refuse_v2_runner(tiny_models, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 3}
    with pytest.raises(LVSpecConfigError, match="VLLM_USE_V2_MODEL_RUNNER"):
        _engine_config(tiny_models, spec)


def test_docs_list_every_option_as_the_code_defines_it():
    from pathlib import Path

    from lvspec_vllm.config import options_markdown

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert options_markdown() in doc, "regenerate the table: python -c 'from lvspec_vllm." \
                                      "config import options_markdown; print(options_markdown())'"


def test_identification_refuses_prefix_caching(tiny_models):
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 3, "loose": True}
    with pytest.raises(LVSpecConfigError, match="--no-enable-prefix-caching"):
        _engine_config(tiny_models, spec)
    cfg = _engine_config(tiny_models, spec, enable_prefix_caching=False)
    assert cfg.additional_config["lvspec"]["loose"] is True


@pytest.mark.parametrize("eager, mode, refused", [
    (False, None, True), (False, "FULL_AND_PIECEWISE", True), (False, "FULL", True),
    (False, "PIECEWISE", False), (False, "NONE", False), (True, None, False)])
def test_identification_refuses_full_cuda_graphs_on_cuda(monkeypatch, eager, mode, refused):
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    from lvspec_vllm.patches.engine_args import _check_combination

    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)  # simulate a GPU
    args = SimpleNamespace(
        logprobs_mode="raw_logprobs", enable_prefix_caching=False, tensor_parallel_size=1,
        enforce_eager=eager, compilation_config=SimpleNamespace(
            cudagraph_mode=None if mode is None else CUDAGraphMode[mode]))
    spec = SimpleNamespace(draft_model_config=None)
    _, cfg = translate({**BASE, "loose": True})
    if refused:
        with pytest.raises(LVSpecConfigError, match="cudagraph_mode"):
            _check_combination(args, spec, cfg)
    else:
        _check_combination(args, spec, cfg)


def test_draft_pruning_needs_a_video_aware_draft_and_no_prefix_caching(tiny_models):
    text_draft = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
                  "num_speculative_tokens": 3, "draft_pruning": True}
    with pytest.raises(LVSpecConfigError) as err:
        _engine_config(tiny_models, text_draft, enable_prefix_caching=False)
    assert "'draft_pruning'" in str(err.value) and "is text-only" in str(err.value)
    vl_draft = {**text_draft, "model": str(tiny_models / "qwen25vl_draft")}
    with pytest.raises(LVSpecConfigError) as err:
        _engine_config(tiny_models, vl_draft)
    assert "'draft_pruning'" in str(err.value) and "--no-enable-prefix-caching" in str(err.value)
    cfg = _engine_config(tiny_models, {**vl_draft, "draft_keep_ratio": 0.25},
                         enable_prefix_caching=False)
    assert cfg.additional_config["lvspec"]["draft_keep_ratio"] == 0.25


@pytest.mark.parametrize("key, value", [("draft_keep_ratio", 0.0), ("draft_keep_ratio", 1.5),
                                        ("draft_stage1_share", -0.1), ("draft_pruning", 1)])
def test_draft_pruning_options_are_ranged(key, value):
    with pytest.raises(LVSpecConfigError, match=f"'{key}'"):
        translate({**BASE, key: value})
