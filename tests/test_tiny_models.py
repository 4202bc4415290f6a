"""Self-check of tests/tiny_models.py: every family saves, loads back through the Auto classes and generates."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from tiny_models import FAMILIES, build_tiny, sample_images

MAX_NEW = 40


def _image_feature_rows(model, inputs) -> int:
    """How many image embeddings the vision side produces for `inputs` (one per image token it will fill)."""
    keys = ("pixel_values", "image_sizes", "image_grid_thw")
    with torch.no_grad():
        out = model.model.get_image_features(**{k: inputs[k] for k in keys if k in inputs})
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
    return feats.reshape(-1, feats.shape[-1]).shape[0]


def test_sample_images_deterministic():
    a, b = sample_images(3, seed=1), sample_images(3, seed=1)
    assert [im.size for im in a] == [im.size for im in b]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert all(im.mode == "RGB" for im in a)
    assert sample_images(1, seed=0)[0].tobytes() != sample_images(1, seed=5)[0].tobytes()


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny("nope", tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_load_generate(family, tmp_path):
    out = build_tiny(family, tmp_path / family, seed=0)
    assert out == tmp_path / family
    text_only = family == "text_llm"
    if text_only:
        processor = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = processor
    else:
        processor = AutoProcessor.from_pretrained(out)
        model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
        tokenizer = processor.tokenizer
    model.eval()
    text_cfg = model.config.get_text_config()
    assert text_cfg.max_position_embeddings >= 512
    assert 300 <= text_cfg.vocab_size <= 600 and len(tokenizer) <= text_cfg.vocab_size
    eos = tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == eos
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    for n_images in [0] if text_only else [0, 1, 2]:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": "Describe the picture, please."}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text_only:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        else:
            images = sample_images(n_images, seed=n_images) if n_images else None
            inputs = processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False)
            n_tok = int((inputs["input_ids"] == model.config.image_token_id).sum())
            if n_images:
                assert 4 <= n_tok // n_images <= 64
                assert n_tok == _image_feature_rows(model, inputs)
            else:
                assert n_tok == 0
        assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id
        seq = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        new = seq[0, inputs["input_ids"].shape[1] :].tolist()
        assert len(new) == MAX_NEW or (0 < len(new) < MAX_NEW and new[-1] == eos)
        assert len(set(new)) > 1  # random weights, but not one token repeated


def test_deterministic_weights(tmp_path):
    a = build_tiny("text_llm", tmp_path / "a", seed=3)
    b = build_tiny("text_llm", tmp_path / "b", seed=3)
    c = build_tiny("text_llm", tmp_path / "c", seed=4)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
