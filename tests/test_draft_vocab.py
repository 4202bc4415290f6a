"""Reduced draft vocabularies: the token map's tables, its refusals, and `train-drafter --draft-vocab N` end to end (the
N most frequent learned tokens, a head over them, lossless decoding that drafts only inside them; the export of
d2t / t2d is in test_external_drafters' round trip)."""

import pytest
import torch

import mmspec
from mmspec import TreeConfig
from mmspec.data_tools.jsonl import read_conversations
from mmspec.draft_vocab import ids_from_map, mask, most_frequent, offsets, restrict_teacher
from mmspec.errors import InputError
from mmspec.pipeline import load_target
from mmspec.train import TrainConfig, encode_conversation, train_drafter
from test_train import PROMPT, write_data


def test_most_frequent_table():
    counts = torch.tensor([0, 5, 2, 5, 0, 9, 2])
    assert most_frequent(counts, 3).tolist() == [1, 3, 5]  # ascending ids of the top 3
    assert most_frequent(counts, 4).tolist() == [1, 2, 3, 5]  # a tie (2 vs 6, both 2) goes to the lower id
    assert most_frequent(counts, 6).tolist() == [0, 1, 2, 3, 5, 6]  # unseen tokens fill in id order
    with pytest.raises(InputError, match="1..7"):
        most_frequent(counts, 8)


def test_token_map_spellings_and_refusals():
    ids = torch.tensor([2, 3, 7, 10])
    d2t, t2d = offsets(ids), mask(ids, 12)
    assert d2t.tolist() == [2, 2, 5, 7] and t2d.nonzero().flatten().tolist() == [2, 3, 7, 10]
    assert ids_from_map(d2t, t2d, 12, "ck").tolist() == ids.tolist()
    with pytest.raises(InputError, match="outside the target's vocabulary of 10"):
        ids_from_map(d2t, None, 10, "ck")
    with pytest.raises(InputError, match="same target id"):
        ids_from_map(torch.tensor([1, 0]), None, 12, "ck")
    with pytest.raises(InputError, match="t2d does not mark"):
        ids_from_map(d2t, mask(torch.tensor([2, 3, 7, 11]), 12), 12, "ck")
    with pytest.raises(InputError, match="integer"):
        ids_from_map(d2t.float(), None, 12, "ck")


def test_restrict_teacher_drops_positions_outside_the_vocabulary():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 0.0]])  # top-1: token 1, then token 0
    sub, valid = restrict_teacher(logits, torch.tensor([1, 2]), torch.tensor([True, True]))
    assert sub.tolist() == [[5.0, 1.0], [0.0, 1.0]] and valid.tolist() == [True, False]


def test_train_drafter_with_a_draft_vocabulary(tiny_dir, tmp_path):
    target = tiny_dir("llava")
    data = write_data(tmp_path, n=8, images=False)
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=1, eval_fraction=0.0, ttt_steps=2, vision_adaptor=False,
                      draft_vocab=24)
    train_drafter(str(target), data, tmp_path / "d", cfg, device="cpu")
    # the expected vocabulary, counted here over the conversations' learned tokens
    model, processor, adapter = load_target(target)
    counts = torch.zeros(model.config.text_config.vocab_size, dtype=torch.long)
    for conv in read_conversations(data)[0]:
        inputs, learned = encode_conversation(adapter, processor, conv)
        counts += torch.bincount(inputs["input_ids"][0][learned], minlength=counts.numel())
    want = most_frequent(counts, 24).tolist()
    pipe = mmspec.load(target, tmp_path / "d", device="cpu", tree=TreeConfig(depth=3, top_k=4, total_tokens=10))
    d = pipe.drafter
    assert d.config.draft_vocab_size == 24 and d.draft_token_ids.tolist() == want
    assert len(set(want) - set(range(24))) > 0  # not the identity map: the test can see a wrong offset
    inputs = pipe.prepare(PROMPT)
    ref = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=16)[0, inputs["input_ids"].shape[1]:].tolist()
    trees, out = [], []
    for ev in pipe.stream(PROMPT, max_new_tokens=16):
        out.extend(ev.token_ids)
        trees += [] if ev.tree is None else [ev.tree.tokens[1:]]
    assert out == ref and set(torch.cat(trees).tolist()) <= set(want)
