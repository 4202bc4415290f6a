"""Layer 2: token-identical to `target.generate` for tiny random-weight configs of every supported family, fp32 on CPU.

Three proposers: none (plain autoregressive through the same loop), an untrained drafter (almost every draft rejected),
and an oracle that proposes the target's own next tokens inside a tree with wrong siblings, so long paths are accepted
and the KV-cache gather of a non-contiguous path is exercised on every step.
"""

import pytest
import torch

import mmspec
from mmspec import DraftTree, TreeConfig
from mmspec.engine import decode
from mmspec.proposer import NullProposer
from tiny_models import FAMILIES, sample_images

MAX_NEW = 48
PROMPT = "Describe the picture in detail."


class OracleProposer:
    """Drafts the reference continuation: each step a path of `depth` true tokens, with a wrong sibling placed before
    every true node (so the accepted path is never a prefix of node indices), and every third step a wrong token at
    depth 3 (so acceptance stops mid-path)."""

    needs_features = False
    forwards_per_step = 0

    def __init__(self, reference: list[int], vocab: int, depth: int = 5):
        self.ref, self.vocab, self.depth = reference, vocab, depth
        self.done = 1  # the prefill committed ref[0]
        self.step = 0

    def start(self, prompt, first_token, first_pos):
        pass

    def propose(self, root, root_pos):
        true = self.ref[self.done : self.done + self.depth]
        if self.step % 3 == 2 and len(true) >= 3:
            true = true[:2] + [(true[2] + 1) % self.vocab] + true[3:]
        tokens, parents = [int(root)], [-1]
        parent = 0
        for t in true:
            tokens += [(t + 7) % self.vocab, t]  # wrong sibling first, then the true token
            parents += [parent, parent]
            parent = len(tokens) - 1
        self.step += 1
        return DraftTree.from_parents(torch.tensor(tokens, device=root.device), parents)

    def commit(self, tree, acceptance, hidden_states):
        self.done += len(acceptance.tokens)


def reference(pipe, inputs, max_new=MAX_NEW):
    out = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=max_new)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def run(pipe, proposer, inputs, max_new=MAX_NEW):
    positions, next_pos = pipe.adapter.prompt_positions(pipe.target, inputs)
    tokens, events = [], []
    for ev in decode(pipe.runner, proposer, inputs, positions, next_pos, mmspec.SamplingConfig(), max_new,
                     pipe.stop_ids, None):
        tokens.extend(ev.token_ids)
        events.append(ev)
    return tokens, events


CASES = [(f, n) for f in FAMILIES for n in ((0,) if f == "text_llm" else (0, 1, 2))]


@pytest.fixture(scope="module")
def pipes(tiny_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = mmspec.load(tiny_dir(family), "untrained", device="cpu",
                                        tree=TreeConfig(depth=4, top_k=3, total_tokens=10))
        return cache[family]

    return get


@pytest.mark.parametrize("family,n_images", CASES)
def test_token_identical_to_generate(pipes, family, n_images):
    pipe = pipes(family)
    images = sample_images(n_images, seed=n_images)
    inputs = pipe.prepare(PROMPT, images)
    ref = reference(pipe, inputs)
    assert len(ref) == MAX_NEW or ref[-1] in pipe.stop_ids

    plain = pipe.generate(PROMPT, images, max_new_tokens=MAX_NEW, speculative=False)
    assert plain.token_ids == ref and plain.stats.mean_accepted == 1.0

    spec = pipe.generate(PROMPT, images, max_new_tokens=MAX_NEW)
    assert spec.token_ids == ref
    assert spec.stats.draft_forwards == 4 * (spec.stats.target_forwards - 1)

    oracle, events = run(pipe, OracleProposer(ref, pipe.target.config.get_text_config().vocab_size), inputs)
    assert oracle == ref
    assert max(ev.num_accepted for ev in events) >= 4  # long paths were accepted and gathered
    assert len(events) < len(ref) / 2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_eos_inside_an_accepted_path(pipes, family):
    """A stop token in the middle of an accepted path ends the output right after it, as generate does."""
    pipe = pipes(family)
    images = sample_images(1)
    inputs = pipe.prepare(PROMPT, images)
    ref = reference(pipe, inputs)
    stop = ref[9]
    ref_stop = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=stop)
    ref_stop = ref_stop[0, inputs["input_ids"].shape[1] :].tolist()
    assert ref_stop == ref[: ref.index(stop) + 1]
    saved = pipe.stop_ids
    try:
        pipe.stop_ids = frozenset([stop])
        got, events = run(pipe, OracleProposer(ref, 512), inputs)
    finally:
        pipe.stop_ids = saved
    assert got == ref_stop
    assert any(ev.num_accepted > 0 and ev.token_ids[-1] == stop for ev in events)


def test_max_new_tokens_cuts_exactly(pipes):
    pipe = pipes("llava")
    inputs = pipe.prepare(PROMPT, sample_images(1))
    ref = reference(pipe, inputs, max_new=13)
    got, _ = run(pipe, OracleProposer(reference(pipe, inputs), 512), inputs, max_new=13)
    assert got == ref and len(got) == 13
    assert pipe.generate(PROMPT, sample_images(1), max_new_tokens=1).token_ids == ref[:1]


def test_stream_events_add_up_to_generate(pipes):
    pipe = pipes("qwen2_vl")
    images = sample_images(2)
    res = pipe.generate(PROMPT, images, max_new_tokens=30)
    events = list(pipe.stream(PROMPT, images, max_new_tokens=30))
    assert [t for ev in events for t in ev.token_ids] == res.token_ids
    assert "".join(ev.text for ev in events) == res.text
    s = res.stats
    assert s.new_tokens == len(res.token_ids) and s.target_forwards == len(events)
    assert s.wall_s >= s.draft_s + s.verify_s and s.tokens_per_s > 0


def test_null_proposer_loop_is_plain_decoding(pipes):
    pipe = pipes("text_llm")
    inputs = pipe.prepare(PROMPT)
    got, events = run(pipe, NullProposer(), inputs)
    assert got == reference(pipe, inputs) and all(len(ev.token_ids) == 1 for ev in events)


def test_device_map_loading_path(tiny_dir):
    """device_map hands placement to transformers/accelerate; on one CPU it must still decode exactly."""
    pipe = mmspec.load(tiny_dir("qwen2_vl"), "untrained", device_map={"": "cpu"}, dtype="float32")
    images = sample_images(1)
    inputs = pipe.prepare(PROMPT, images)
    assert pipe.generate(PROMPT, images, max_new_tokens=24).token_ids == reference(pipe, inputs, max_new=24)
    assert pipe.drafter.q_proj.weight.device == pipe.target.get_output_embeddings().weight.device
