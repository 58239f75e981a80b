"""LVSpec options: one typed, documented schema, validated once at startup.

Users pass the options flat inside vLLM's ``--speculative-config`` next to vLLM's own keys::

    {"method": "lvspec", "model": DRAFT, "num_speculative_tokens": 8, "relevance_threshold": 0.3}

``lvspec_vllm.patches.engine_args`` splits them off, validates them here in the API process and
ships the result to every worker inside ``VllmConfig.additional_config["lvspec"]``. Nothing else in
the plugin reads options from anywhere else.

Strict verification (``loose`` false, the default) is lossless.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_GUARD_WORDS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "not", "no", "never")
# Spec-decode lengths beyond this cost more verify compute than any acceptance pays back, and
# vLLM's rejection sampler caps max_spec_len at 128 anyway.
MAX_SPECULATIVE_TOKENS = 32


class LVSpecConfigError(ValueError):
    """A bad LVSpec option. The message names the key, the value and what is allowed."""


def _opt(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, choices: tuple | None = None, nullable: bool = False):
    return field(default=default, metadata=dict(doc=doc, lo=lo, hi=hi, lo_open=lo_open,
                                                choices=choices, nullable=nullable))


@dataclass(frozen=True)
class LVSpecConfig:
    # -- master switch -----------------------------------------------------------------------
    loose: bool = _opt(False, "Loose verification of filler tokens. false: strict, lossless "
                              "(outputs equal the target's own greedy decoding).")
    # -- anchors: positions that stay strict ---------------------------------------------------
    anchor_identification: bool = _opt(True, "Keep visually grounded positions strict. false: "
                                             "every non-guarded position may be loose (ablation).")
    relevance_threshold: float = _opt(0.25, "Visual attention mass at or above which a position "
                                            "is an anchor (absolute mode).", lo=0.0, hi=1.0)
    relevance_mode: str = _opt("absolute", "How v_j is thresholded: against relevance_threshold, "
                                           "or against the request's own running mean + "
                                           "relevance_sigma standard deviations.",
                               choices=("absolute", "relative"))
    relevance_sigma: float = _opt(1.0, "Standard deviations above the request's mean v for an "
                                       "anchor (relative mode).", lo=0.0, hi=10.0)
    relevance_layers: tuple = _opt((0.5, 0.625, 0.75), "Target decoder layers whose attention "
                                   "gives v_j: ints are layer indices (negative counts from the "
                                   "end), floats in (0, 1) are fractions of the depth.")
    codebook: bool = _opt(True, "Once a token id is judged an anchor in a request, it stays "
                                "strict for the rest of that request.")
    guard_words: tuple = _opt(DEFAULT_GUARD_WORDS, "Words always verified strictly (with EOS and "
                              "every special or stop token), mapped to ids by the tokenizer.")
    text_only_requests: str = _opt("strict", "Requests without any image or video have no visual "
                                             "evidence: verify them strictly, or loosely.",
                                   choices=("strict", "loose"))
    # -- loose acceptance of a filler mismatch ---------------------------------------------------
    plausibility: bool = _opt(True, "Accept a filler draft the target finds plausible.")
    plausibility_ratio: float = _opt(0.3, "Plausible if p(draft) >= ratio * p(target's top).",
                                     lo=0.0, hi=1.0, lo_open=True)
    plausibility_top_k: int = _opt(5, "Plausible drafts must also be in the target's top-k.",
                                   lo=1, hi=1024)
    semantic: bool = _opt(True, "Accept a filler draft whose embedding is close to the target's.")
    semantic_threshold: float = _opt(0.8, "Cosine similarity of the target's embedding rows at "
                                          "or above which two tokens are equivalent.",
                                     lo=-1.0, hi=1.0)
    shift: bool = _opt(True, "Tolerate drafts that are a few positions off the target's plan.")
    shift_window: int = _opt(2, "Largest position shift tolerated.", lo=1, hi=8)
    entropy_gate: float | None = _opt(None, "If set, a mismatch where the target's top-3 "
                                            "entropy is below this stays strict.",
                                      lo=0.0, hi=20.0, nullable=True)
    max_loose_per_step: int | None = _opt(None, "If set, at most this many loose accepts per "
                                                "request and step.", lo=0, hi=64, nullable=True)
    # -- what the draft sees (SpecVLM's verifier-guided pruning) -------------------------------
    draft_pruning: bool = _opt(False, "A video-aware draft attends to only a share of each video's "
                                      "tokens, chosen from the target's prefill attention (the "
                                      "target is never pruned).")
    draft_keep_ratio: float = _opt(0.1, "Share of each video's tokens the pruned draft keeps.",
                                   lo=0.0, hi=1.0, lo_open=True)
    draft_stage1_share: float = _opt(0.4, "Stage I keeps the tokens with the most attention from "
                                          "the prompt's text until they hold this share of the "
                                          "video's total; stage II spreads the rest of the budget "
                                          "uniformly.", lo=0.0, hi=1.0)
    # -- how many tokens to draft ---------------------------------------------------------------
    auto_k: bool = _opt(False, "Choose k per step (0 to num_speculative_tokens) from the batch "
                               "size, the measured acceptance per position and the measured step "
                               "costs (a goodput model). Excludes "
                               "num_speculative_tokens_per_batch_size.")
    draft_catch_up: bool = _opt(True, "In a step with k = 0 (auto_k or a schedule), decoding "
                                      "requests skip the draft's forward; the draft catches up "
                                      "on their tokens in one pass the next time it runs for them, "
                                      "at the latest when a KV block fills. false: vLLM's "
                                      "behaviour, a draft forward every step.")
    draft_cold_requests: bool = _opt(False, "A request first scheduled in a step with k = 0 "
                                            "never runs the draft (no draft prefill, no drafts "
                                            "for it in later steps); its outputs are the "
                                            "target's. Needs draft_catch_up, and auto_k or a "
                                            "schedule with k = 0; not with async scheduling.")
    plain_k0_steps: bool = _opt(True, "A step that verifies no drafts and drafts none (k = 0, "
                                      "or every row cold), and in which the draft runs no "
                                      "forward, takes vLLM's plain path (no spec-decode "
                                      "metadata, vLLM's sampler, no drafter call), as in an "
                                      "engine without speculation. Applies with "
                                      "draft_catch_up or a schedule that never drafts, without "
                                      "async scheduling, pipeline or data parallelism, KV "
                                      "transfer or hybrid models. false: vLLM's speculative "
                                      "path in every step.")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "LVSpecConfig":
        """Validate user options; raise LVSpecConfigError naming the key and the fix."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in options.items():
            key = key.replace("-", "_")
            if key not in known:
                raise LVSpecConfigError(
                    f"unknown LVSpec option {key!r}. Allowed LVSpec keys: {', '.join(known)} "
                    f"(plus vLLM's own speculative_config keys).")
            values[key] = _check(known[key], value)
        cfg = cls(**values)
        return cfg

    def needs_relevance(self) -> bool:
        """Whether the target's visual attention must be captured (loose with anchors)."""
        return self.loose and self.anchor_identification

    def captures_attention(self) -> bool:
        """Whether the target's attention layers are hooked at all (anchors or pruning)."""
        return self.needs_relevance() or self.draft_pruning

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        if not self.loose:
            return "strict (lossless)"
        rules = [name for name in ("plausibility", "semantic", "shift") if getattr(self, name)]
        return f"loose ({', '.join(rules) or 'no rule enabled'})"


def _type_name(f: dataclasses.Field) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            tuple: "a list"}.get(type(f.default) if f.default is not None else
                                 (float if "float" in str(f.type) else int), "a value")


def _check(f: dataclasses.Field, value: Any) -> Any:
    m = f.metadata
    key = f.name
    if value is None:
        if m["nullable"]:
            return None
        raise LVSpecConfigError(f"LVSpec option {key!r} may not be null; give {_type_name(f)}.")
    kind = type(f.default) if f.default is not None else (float if "float" in str(f.type) else int)
    if kind is bool:
        if not isinstance(value, bool):
            raise LVSpecConfigError(f"LVSpec option {key!r} must be true or false, got {value!r}.")
        return value
    if kind is str:
        if value not in m["choices"]:
            raise LVSpecConfigError(f"LVSpec option {key!r} must be one of "
                                    f"{', '.join(map(repr, m['choices']))}; got {value!r}.")
        return value
    if kind in (int, float):
        ok_type = (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
        if isinstance(value, bool) or not ok_type:
            raise LVSpecConfigError(f"LVSpec option {key!r} must be {_type_name(f)}, got "
                                    f"{value!r} ({type(value).__name__}).")
        lo, hi = m["lo"], m["hi"]
        if (lo is not None and (value <= lo if m["lo_open"] else value < lo)) or \
                (hi is not None and value > hi):
            bracket = "(" if m["lo_open"] else "["
            raise LVSpecConfigError(f"LVSpec option {key!r}={value!r} is out of range; allowed: "
                                    f"{bracket}{lo}, {hi}].")
        return kind(value)
    # lists
    if not isinstance(value, (list, tuple)):
        raise LVSpecConfigError(f"LVSpec option {key!r} must be a list, got {value!r}.")
    if key == "guard_words":
        if not all(isinstance(w, str) and w for w in value):
            raise LVSpecConfigError(f"LVSpec option 'guard_words' must be a list of non-empty "
                                    f"strings, got {value!r}.")
        return tuple(value)
    if key == "relevance_layers":
        if not value:
            raise LVSpecConfigError("LVSpec option 'relevance_layers' needs at least one layer.")
        for x in value:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or \
                    (isinstance(x, float) and not 0.0 < x < 1.0):
                raise LVSpecConfigError(
                    f"LVSpec option 'relevance_layers' entry {x!r} is invalid; allowed: an "
                    f"integer layer index, or a float in (0, 1) for a fraction of the depth.")
        return tuple(value)
    raise AssertionError(f"no validator for list option {key}")


def options_markdown() -> str:
    """The options table of docs/configuration.md (a test keeps the two identical)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(LVSpecConfig):
        m = f.metadata
        if m["choices"]:
            allowed = " / ".join(f"`{c}`" for c in m["choices"])
        elif m["lo"] is not None:
            allowed = f"{'(' if m['lo_open'] else '['}{m['lo']}, {m['hi']}]"
            allowed += " or null" if m["nullable"] else ""
        elif isinstance(f.default, bool):
            allowed = "true / false"
        else:
            allowed = "list"
        default = json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)
        rows.append(f"| `{f.name}` | `{default}` | {allowed} | {m['doc']} |")
    return "\n".join(rows)


# -- presets ------------------------------------------------------------------------------------
def _preset_dir() -> Path:
    from lvspec_vllm import configs  # configs/ in the repository, packaged with the plugin

    return Path(configs.__file__).resolve().parent


PRESET_DIR = _preset_dir()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A ready ``--speculative-config`` dict from configs/ (by name) or from a JSON file.

    ``{tiny_models}`` in a string value becomes the directory of the tiny test checkpoints
    (built on first use) and ``{world_models}`` the trained benchmark pair shipped with the
    package, so the demo presets work on any machine.
    """
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise LVSpecConfigError(f"no LVSpec preset {name_or_path!r}; presets: "
                                f"{', '.join(preset_names())}")
    preset = json.loads(path.read_text())
    for key, root in (("{tiny_models}", _tiny_models), ("{world_models}", _world_models)):
        if any(isinstance(v, str) and key in v for v in preset.values()):
            where = str(root())
            preset = {k: v.replace(key, where) if isinstance(v, str) else v
                      for k, v in preset.items()}
    return preset


def _tiny_models() -> Path:
    from lvspec_vllm.testing.tiny_models import ensure_tiny_models

    return ensure_tiny_models()


def _world_models() -> Path:
    from lvspec_vllm.world import checkpoints_dir

    return checkpoints_dir()


def preset_main(argv: list[str] | None = None) -> None:
    """``lvspec-preset NAME [key=value ...]``: print a preset as a --speculative-config value."""
    import argparse

    ap = argparse.ArgumentParser(prog="lvspec-preset", description=preset_main.__doc__)
    ap.add_argument("name", help=f"one of: {', '.join(preset_names())}, or a .json file")
    ap.add_argument("overrides", nargs="*", help="key=value (value parsed as JSON if it can be)")
    args = ap.parse_args(argv)
    preset = load_preset(args.name)
    for item in args.overrides:
        key, _, raw = item.partition("=")
        try:
            preset[key] = json.loads(raw)
        except json.JSONDecodeError:
            preset[key] = raw
    # Validate every key now (LVSpec's and vLLM's), so a typo fails here, not at server start.
    from lvspec_vllm.patches.engine_args import translate

    translate(preset)
    print(json.dumps(preset))
