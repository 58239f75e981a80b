"""The video-aware drafter's pure parts: first-pass M-RoPE positions, the draft's encoder cache and
where its embeddings go, and which vision-language drafts fit which targets."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from vllm.multimodal.inputs import PlaceholderRange

from lvspec_vllm.drafter.compat import SUPPORTED_VL_DRAFTS, vl_draft_problem
from lvspec_vllm.drafter.positions import draft_mrope_positions, sequence_positions
from lvspec_vllm.drafter.vision import DraftVision, Window


# -- positions -------------------------------------------------------------------------------------
def _qsl(lengths):
    return [0, *itertools.accumulate(lengths)]


def _reference_positions(target, qsl, slots):
    """Loop version: request r's token j sits at qsl[r] + r*slots + j; within the target's tokens
    it takes the target's rows, past them it is text one past the last row per step."""
    out = []
    for r in range(len(qsl) - 1):
        n = qsl[r + 1] - qsl[r]
        for j in range(n + slots):
            if j < n:
                out.append(target[:, qsl[r] + j])
            else:
                out.append(target[:, qsl[r] + n - 1] + (j - n + 1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("lengths, slots", [([1], 1), ([5, 1, 3], 1), ([2, 7], 3), ([4] * 6, 1)])
def test_draft_mrope_positions_follow_the_target_then_advance_as_text(lengths, slots):
    gen = torch.Generator().manual_seed(sum(lengths) + slots)
    qsl = _qsl(lengths)
    target = torch.randint(0, 1000, (3, qsl[-1]), generator=gen)
    num_out = qsl[-1] + slots * len(lengths)
    got = draft_mrope_positions(target, torch.tensor(qsl, dtype=torch.int32), slots, num_out)
    assert torch.equal(got, _reference_positions(target, qsl, slots))


def test_draft_mrope_positions_after_a_video_trail_the_sequence_index():
    # A prompt of 2 text tokens, a 2x2x1 video grid (4 tokens: t=2, h,w in {2,3}), 1 text token:
    # the target's rows; the sampled token after it is text at max + 1.
    target = torch.tensor([[0, 1, 2, 2, 2, 2, 4],
                           [0, 1, 2, 2, 3, 3, 4],
                           [0, 1, 2, 3, 2, 3, 4]])
    got = draft_mrope_positions(target, torch.tensor([0, 7]), 1, 8)
    assert got[:, 7].tolist() == [5, 5, 5]  # sequence index 7, M-RoPE position 5


@pytest.mark.parametrize("lengths, pad", [([1], 0), ([5, 1, 3], 0), ([2, 7], 4), ([4] * 6, 1)])
def test_sequence_positions_end_each_request_at_its_length(lengths, pad):
    gen = torch.Generator().manual_seed(sum(lengths) + pad)
    qsl = _qsl(lengths)
    seq_lens = [n + int(torch.randint(0, 50, (1,), generator=gen)) for n in lengths]
    want = [s - n + j for n, s in zip(lengths, seq_lens) for j in range(n)]
    want += [want[-1] + 1 + j for j in range(pad)]  # padding continues the last request
    got = sequence_positions(torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), qsl[-1] + pad)
    assert got.tolist() == want


# -- the draft's encoder cache ---------------------------------------------------------------------
class _FakeEncoder:
    """embed_multimodal over fake items: item i's rows are i*100 + row, hidden 2."""

    def __init__(self):
        self.calls = []

    def embed_multimodal(self, **batch):
        ids = batch["item"].tolist()
        self.calls.append(ids)
        return [torch.stack([torch.full((2,), i * 100.0 + r) for r in range(n)])
                for i, n in zip(ids, batch["rows"].tolist())]


def _feature(ident, offset, length, is_embed=None):
    from vllm.multimodal.inputs import MultiModalFieldElem, MultiModalKwargsItem
    from vllm.multimodal.inputs import MultiModalBatchedField

    rows = int(is_embed.sum()) if is_embed is not None else length
    field = MultiModalBatchedField()
    data = MultiModalKwargsItem({
        "item": MultiModalFieldElem(data=torch.tensor(ident), field=field),
        "rows": MultiModalFieldElem(data=torch.tensor(rows), field=field),
    })
    return SimpleNamespace(identifier=str(ident), modality="video", data=data,
                           mm_position=PlaceholderRange(offset=offset, length=length,
                                                        is_embed=is_embed))


def test_gather_places_the_drafts_own_rows_at_the_placeholders_in_the_expanded_layout():
    enc = _FakeEncoder()
    vision = DraftVision(enc, torch.device("cpu"))
    a = _feature(1, offset=2, length=4)  # request 0: tokens 2..5 are video
    b = _feature(2, offset=1, length=3, is_embed=torch.tensor([False, True, True]))
    # request 0 schedules its 8-token prompt; request 1 a chunk [2, 5) of its prompt
    windows = [Window([a], num_computed=0, num_scheduled=8, out_start=0),
               Window([b], num_computed=2, num_scheduled=3, out_start=8 + 1)]
    embeds, mask = vision.gather(windows, num_out=8 + 1 + 3 + 1)
    assert enc.calls == [[1, 2]]  # both items in one encoder call
    assert mask.nonzero().flatten().tolist() == [2, 3, 4, 5, 9, 10]
    # b's chunk covers its placeholders 1 and 2, both embedded: its encoder rows 0 and 1
    assert torch.cat(embeds)[:, 0].tolist() == [100, 101, 102, 103, 200, 201]
    # a later step reuses the cache; an item no live request refers to is dropped
    vision.gather(windows[:1], num_out=9)
    assert enc.calls == [[1, 2]]
    vision.retain({"1"})
    assert set(vision.cache) == {"1"} and vision.cache_bytes() == 4 * 2 * 4


def test_gather_returns_none_without_placeholders_in_the_window():
    vision = DraftVision(_FakeEncoder(), torch.device("cpu"))
    a = _feature(1, offset=2, length=4)
    assert vision.gather([Window([a], num_computed=10, num_scheduled=5, out_start=0)], 6) is None
    assert vision.cache == {}


def test_gather_refuses_an_item_whose_pixels_are_gone():
    vision = DraftVision(_FakeEncoder(), torch.device("cpu"))
    a = _feature(1, offset=0, length=4)
    a.data = None
    with pytest.raises(RuntimeError, match="no pixels for multimodal item 1"):
        vision.gather([Window([a], num_computed=0, num_scheduled=4, out_start=0)], 5)


# -- which drafts fit ------------------------------------------------------------------------------
def _qwen(**vision):
    v = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
             tokens_per_second=2)
    v.update(vision)
    return SimpleNamespace(architectures=["Qwen2_5_VLForConditionalGeneration"],
                           vision_config=SimpleNamespace(**v), image_token_id=5,
                           video_token_id=6, vision_start_token_id=7)


def test_vl_draft_problem_accepts_the_same_family_and_names_what_differs():
    assert vl_draft_problem(_qwen(), _qwen()) is None
    problem = vl_draft_problem(_qwen(), _qwen(tokens_per_second=4))
    assert "vision_config.tokens_per_second (draft 4, target 2)" in problem
    other = SimpleNamespace(architectures=["Idefics3ForConditionalGeneration"])
    problem = vl_draft_problem(_qwen(), other)
    assert "Idefics3ForConditionalGeneration" in problem
    assert all(arch in problem for arch in SUPPORTED_VL_DRAFTS)


def test_the_proposer_methods_the_drafter_overrides_are_vllms():
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    from lvspec_vllm.drafter.compat import proposer_hook_problems

    assert proposer_hook_problems(DraftModelProposer) == []

    class Changed:
        def set_inputs_first_pass(self, inputs):
            pass

    problems = proposer_hook_problems(Changed)
    assert "Changed.set_inputs_first_pass('inputs',)" in problems[0]
    assert "build_model_inputs_first_pass is gone" in problems[1]


def test_after_a_plain_step_the_runner_offers_the_scheduler_no_drafts():
    # An earlier step's drafts stay in the runner's host copy; the engine core asks for drafts
    # after every step at k > 0, a plain one among them (all rows cold), and must get none.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lvspec_vllm.patches import plain_step

    recorded = []
    runner = SimpleNamespace(
        num_spec_tokens=4, _draft_token_req_ids=["a", "b"],
        _draft_token_ids=[[1, 2, 3, 4], [5, 6, 7, 8]],
        speculative_config=None, input_ids=SimpleNamespace(gpu=torch.arange(8)),
        drafter=SimpleNamespace(end_plain_step=recorded.append))
    runner._get_draft_token_ids_cpu = lambda: (runner._draft_token_ids, runner._draft_token_req_ids)
    assert GPUModelRunner.take_draft_token_ids(runner) is not None  # what it would hand back
    runner.__dict__[plain_step._HIDDEN] = ("the speculative config", 2)
    assert plain_step.end(runner)
    assert runner.speculative_config == "the speculative config"
    assert recorded[0].tolist() == [0, 1]
    assert GPUModelRunner.take_draft_token_ids(runner) is None
