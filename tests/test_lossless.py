"""Layer 2: token-identical to `target.generate` for tiny random-weight configs of every supported family, fp32 on CPU.

Three proposers: none (plain autoregressive through the same loop), an untrained drafter (almost every draft rejected),
and an oracle that proposes the target's own next tokens inside a tree with wrong siblings, so long paths are accepted
and the KV-cache gather of a non-contiguous path is exercised on every step.
"""

import pytest
import torch

import mmspec
from mmspec import DraftTree, TreeConfig
from mmspec.engine import decode, guidance
from mmspec.proposer import EagleProposer, NullProposer
from mmspec.verify import accept_greedy
from tiny_models import FAMILIES, sample_images

MAX_NEW = 48
PROMPT = "Describe the picture in detail."


class OracleProposer:
    """Drafts the reference continuation: each step a path of `depth` true tokens, with a wrong sibling placed before
    every true node (so the accepted path is never a prefix of node indices), and every third step a wrong token at
    depth 3 (so acceptance stops mid-path)."""

    needs_features = False
    forwards = 0

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

    def commit(self, tree, acceptance, hidden_states, scores=None):
        self.done += len(acceptance.tokens)


def reference(pipe, inputs, max_new=MAX_NEW):
    out = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=max_new)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def run(pipe, proposer, inputs, max_new=MAX_NEW):
    tokens, events = [], []
    for ev in decode(pipe.runner, proposer, inputs, accept_greedy, max_new, pipe.stop_ids):
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

    calls = []
    hook = pipe.drafter.register_forward_hook(lambda *_: calls.append(1))
    try:
        spec = pipe.generate(PROMPT, images, max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert spec.token_ids == ref
    steps = spec.stats.target_forwards - 1
    # counted, not declared: a catch-up forward every step, up to 3 beam forwards more (fewer once pruning stops)
    assert spec.stats.draft_forwards == len(calls) and steps <= len(calls) <= 4 * steps

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
    assert s.draft_s > 0 and s.verify_s > 0 and s.prefill_s > 0
    assert s.tokens_per_s == pytest.approx(s.new_tokens / s.wall_s)
    plain = pipe.generate(PROMPT, images, max_new_tokens=30, speculative=False).stats
    assert plain.draft_forwards == 0 and plain.target_forwards == plain.new_tokens


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


def naive_cfg(model, rows: list[list[int]], scale: float, n: int, cond_extra: dict) -> list[int]:
    """The reference for two-row guidance: each step, each row's own full forward (no cache, no padding), combined.
    `cond_extra` (pixel values, image grids) goes with the cond row."""
    out = []
    for _ in range(n):
        logits = []
        for i, r in enumerate(rows):
            extra = dict(cond_extra) if i == 0 else {}
            if "mm_token_type_ids" in extra:  # one type per token: generated tokens are text (0)
                extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros(1, len(out)).long()], 1)
            logits.append(model(input_ids=torch.tensor([r + out]), use_cache=False, **extra).logits[0, -1])
        out.append(int((logits[1] + scale * (logits[0] - logits[1])).argmax()))
    return out


@pytest.mark.parametrize("family,n_images", [("text_llm", 0), ("qwen2_vl", 0), ("qwen2_vl", 1)])
def test_two_cfg_rows_under_one_tree_equal_the_naive_reference(pipes, family, n_images):
    """Rows of different lengths (the uncond row left-padded, without the image) verified with one tree per step,
    combined before acceptance, equal two separate forwards per step; the drafter reads the cond row. With an image
    on Qwen2-VL the rows' M-RoPE positions differ too."""
    pipe = pipes(family)
    cond_inputs = pipe.prepare(PROMPT, sample_images(n_images))
    cond = cond_inputs["input_ids"][0].tolist()
    extra = {k: cond_inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in cond_inputs}
    uncond = pipe.prepare("A picture.")["input_ids"][0].tolist()
    assert len(uncond) < len(cond)
    width, scale, n = len(cond), 2.5, 24
    inputs = {
        "input_ids": torch.tensor([cond, [0] * (width - len(uncond)) + uncond]),
        "attention_mask": torch.tensor([[1] * width, [0] * (width - len(uncond)) + [1] * len(uncond)]),
        **extra,
    }
    if "mm_token_type_ids" in extra:  # per token, so the padded batch needs a row for the uncond prompt too
        inputs["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros(1, width).long()])
    ref = naive_cfg(pipe.target, [cond, uncond], scale, n, extra)
    vocab = pipe.target.config.get_text_config().vocab_size
    for proposer in (NullProposer(), EagleProposer(pipe.drafter, pipe.tree), OracleProposer(ref, vocab)):
        got, events = [], []
        for ev in decode(pipe.runner, proposer, inputs, accept_greedy, n, frozenset(), combine=guidance(scale)):
            got.extend(ev.token_ids)
            events.append(ev)
        assert got == ref, type(proposer).__name__
    assert max(ev.num_accepted for ev in events) >= 4  # the oracle's long paths: cache edits on both rows


def test_eager_attention_gets_an_additive_mask(tiny_dir):
    """Eager attention adds the mask to its scores, so a bool tree mask would be silently ignored; the runner gives it
    the additive float mask, and a target loaded with eager attention stays token-identical through long paths."""
    from transformers import AutoModelForImageTextToText

    src = tiny_dir("llava")
    base = mmspec.load(src, "untrained", device="cpu")
    eager = AutoModelForImageTextToText.from_pretrained(src, attn_implementation="eager").eval()
    pipe = mmspec.Pipeline(eager, base.processor, base.adapter, base.drafter, base.tree)
    assert not pipe.runner.mask.bool_mask and pipe.runner.mask.buf.dtype == torch.float32
    inputs = pipe.prepare(PROMPT, sample_images(1))
    ref = reference(pipe, inputs)
    got, events = run(pipe, OracleProposer(ref, 512), inputs)
    assert got == ref and max(ev.num_accepted for ev in events) >= 4


def test_no_deprecation_noise_from_the_cache_argument(pipes):
    """The cache goes in under the keyword the installed transformers expects, so users see no FutureWarning."""
    import warnings

    pipe = pipes("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe.generate(PROMPT, sample_images(1), max_new_tokens=12)


def test_uncapturable_input_embeddings_raise(pipes):
    """The vision adaptor reads what the language model receives as inputs_embeds; a target whose language model is
    fed token ids instead is refused, not given placeholder embeddings."""
    from mmspec.target import target_forward

    pipe = pipes("text_llm")  # LlamaForCausalLM: its decoder receives input_ids
    with pytest.raises(mmspec.UserError, match="inputs_embeds"):
        target_forward(pipe.target, pipe.prepare(PROMPT), want_hidden=True, want_embeds=True, all_logits=False)


def test_pruned_drafting_grows_the_same_trees_with_fewer_forwards(pipes):
    """Drafting stops once no deeper candidate can enter the rerank: every step's tree is the one the full-depth beam
    gives, node for node, and the drafter runs fewer forwards."""
    pipe = pipes("llava")
    inputs = pipe.prepare(PROMPT, sample_images(1))
    runs = {}
    for prune in (False, True):
        proposer = EagleProposer(pipe.drafter, TreeConfig(depth=5, top_k=4, total_tokens=10))
        proposer.prune = prune
        events = list(decode(pipe.runner, proposer, inputs, accept_greedy, MAX_NEW, pipe.stop_ids))
        trees = [(ev.tree.tokens.tolist(), ev.tree.parents.tolist()) for ev in events[1:]]
        runs[prune] = trees, proposer.forwards
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < runs[False][1] == 5 * len(runs[False][0])
