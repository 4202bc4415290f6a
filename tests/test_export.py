"""`mmspec export-drafter --format eagle3`: the EAGLE-3 layout vLLM / SGLang load, its refusals, and that the exported
tensors compute what the drafter computes (checked with an independent re-implementation of the engines' layer)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

import mmspec
from mmspec import Drafter
from mmspec.drafter import default_feature_layers
from mmspec.errors import InputError
from mmspec.export import export_eagle3

LAYERS = 7  # the tiny models have 2 decoder layers: too few for three distinct inner feature layers
FEATURE_LAYERS = (5, 1, 3)  # deliberately out of order: the engines concatenate the aux states in layer order

LAYER_KEYS = {
    f"midlayer.{k}.weight"
    for k in ("input_layernorm", "hidden_norm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
}
ALL_KEYS = LAYER_KEYS | {"norm.weight", "fc.weight", "lm_head.weight"}


@pytest.fixture(scope="module")
def target(tiny_dir, tmp_path_factory):
    """A 7-layer variant of the tiny LLaVA (only its config and weights are needed) -> (directory, model)."""
    config = AutoConfig.from_pretrained(tiny_dir("llava"))
    config.text_config.num_hidden_layers = LAYERS
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("llava7")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def deep(tiny_dir, tmp_path_factory):
    """(family, decoder layers) -> (directory, model): a deeper random variant of a tiny family."""
    built = {}

    def get(family: str, layers: int):
        if (family, layers) not in built:
            config = AutoConfig.from_pretrained(tiny_dir(family))
            config.text_config.num_hidden_layers = layers
            if getattr(config.text_config, "layer_types", None):  # Qwen: one attention type per layer
                config.text_config.layer_types = config.text_config.layer_types[:1] * layers
            torch.manual_seed(2)
            model = AutoModelForImageTextToText.from_config(config).eval()
            path = tmp_path_factory.mktemp(f"{family}{layers}")
            model.save_pretrained(path)
            built[family, layers] = (path, model)
        return built[family, layers]

    return get


def _randomize(drafter: Drafter) -> Drafter:
    """Random weights everywhere (norm gains and the injection included), so no identity hides a mistake."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return drafter


def _save(model, path, target_dir, **kw) -> Drafter:
    kw = {"vision_adaptor": False, "fusion": "multi_layer", "feature_layers": FEATURE_LAYERS, **kw}
    drafter = _randomize(Drafter.for_target(model, **kw))
    if target_dir is not None:
        drafter.config.extra["target"] = str(target_dir)
    drafter.save_pretrained(path)
    return drafter


def _target_lm_head(target_dir):
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(next(k for k in f.keys() if k.endswith("lm_head.weight")))


def test_layout_shapes_and_config(target, tmp_path):
    target_dir, model = target
    drafter = _save(model, tmp_path / "d", target_dir)
    out = export_eagle3(tmp_path / "d", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    t = load_file(str(out / "model.safetensors"))
    assert set(t) == ALL_KEYS  # full draft vocabulary: no d2t / t2d
    c, h = drafter.config, drafter.config.hidden_size
    for proj, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads), ("v", c.num_key_value_heads)):
        assert t[f"midlayer.self_attn.{proj}_proj.weight"].shape == (heads * c.head_dim, 2 * h)
    assert t["fc.weight"].shape == (h, 3 * h)
    assert t["midlayer.mlp.down_proj.weight"].shape == (h, c.intermediate_size)
    assert torch.equal(t["lm_head.weight"], _target_lm_head(target_dir))
    assert torch.equal(t["midlayer.input_layernorm.weight"], drafter.input_norm.weight)
    assert torch.equal(t["midlayer.hidden_norm.weight"], drafter.hidden_norm.weight)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    expect = dict(hidden_size=h, intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, num_hidden_layers=1,
                  vocab_size=c.vocab_size, draft_vocab_size=c.vocab_size, tie_word_embeddings=False,
                  rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=None,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                  max_position_embeddings=model.config.text_config.max_position_embeddings, torch_dtype="float32")
    assert {k: cfg[k] for k in expect} == expect
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]  # vLLM: input of layer i = hidden_states[i]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]  # SGLang: output of layer i
    llama = AutoConfig.from_pretrained(out)  # loads as the LlamaConfig the engines build
    assert llama.model_type == "llama" and llama.num_hidden_layers == 1 and llama.head_dim == c.head_dim


def _eagle3_forward(t: dict, cfg: dict, embeds, aux, positions):
    """The engines' EAGLE-3 layer, written from the checkpoint alone. embeds [n, H]; aux [n, 3H] (captured target
    states in layer order); positions [n] -> (pre-norm hidden [n, H] fed back as the next feature, logits [n, V])."""
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    n = embeds.shape[0]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def lin(x, key):
        return x @ t[key].T

    def rope(z):  # [heads, n, hd], neox style (rotate halves)
        ang = positions[:, None].double() / theta ** (torch.arange(0, hd, 2).double() / hd)
        cos, sin = torch.cat([ang, ang], -1).cos().to(z.dtype), torch.cat([ang, ang], -1).sin().to(z.dtype)
        return z * cos + torch.cat([-z[..., hd // 2:], z[..., : hd // 2]], -1) * sin

    m = "midlayer."
    hidden = lin(aux, "fc.weight")
    x = torch.cat([rms(embeds, t[m + "input_layernorm.weight"]), rms(hidden, t[m + "hidden_norm.weight"])], -1)
    q = rope(lin(x, m + "self_attn.q_proj.weight").view(n, nh, hd).transpose(0, 1))
    k = rope(lin(x, m + "self_attn.k_proj.weight").view(n, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
    v = lin(x, m + "self_attn.v_proj.weight").view(n, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, nh * hd)
    hidden = hidden + lin(attn, m + "self_attn.o_proj.weight")
    y = rms(hidden, t[m + "post_attention_layernorm.weight"])
    hidden = hidden + lin(F.silu(lin(y, m + "mlp.gate_proj.weight")) * lin(y, m + "mlp.up_proj.weight"),
                          m + "mlp.down_proj.weight")
    return hidden, lin(rms(hidden, t["norm.weight"]), "lm_head.weight")


@pytest.mark.parametrize("vision", [False, True])
def test_exported_layer_computes_the_drafter(target, tmp_path, vision):
    """Random target states and tokens: the engines' forward over the export equals Drafter.forward (image-free), with
    the ViSpec injection folded into fc when the adaptor is dropped."""
    target_dir, model = target
    drafter = _save(model, tmp_path / "d", target_dir, vision_adaptor=vision).bind(model).eval()
    if vision:
        h = drafter.config.hidden_size
        assert not torch.allclose(drafter.inject.weight[:, :h], torch.eye(h))  # not the [I | 0] initialisation
    out = export_eagle3(tmp_path / "d", tmp_path / "out", drop_vision_adaptor=vision)
    t = {k: v.double() for k, v in load_file(str(out / "model.safetensors")).items()}
    cfg = json.loads((out / "config.json").read_text())

    g = torch.Generator().manual_seed(3)
    n, h = 9, drafter.config.hidden_size
    states = [torch.randn(1, n, h, generator=g) for _ in range(LAYERS + 1)]  # transformers' hidden_states tuple
    tokens = torch.randint(0, drafter.config.vocab_size, (1, n), generator=g)
    positions = torch.arange(4, 4 + n)[None]
    with torch.no_grad():
        ours = drafter(tokens, drafter.fuse(states), positions, None, None)  # image_vec None: no image
        ours_logits = drafter.logits(ours)
        aux = torch.cat([states[i][0] for i in cfg["eagle_aux_hidden_state_layer_ids"]], -1).double()
        embeds = model.get_input_embeddings()(tokens[0]).double()
        theirs, their_logits = _eagle3_forward(t, cfg, embeds, aux, positions[0])
    torch.testing.assert_close(theirs.float(), ours[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(their_logits.float(), ours_logits[0], rtol=1e-4, atol=1e-4)


def test_refusals(tiny_dir, target, tmp_path):
    target_dir, model = target
    small = LlavaForConditionalGeneration.from_pretrained(tiny_dir("llava"))  # 2 decoder layers
    cases = [
        (dict(model=model, vision_adaptor=True), "vLLM/SGLang cannot run the ViSpec adaptor; --drop-vision-adaptor"),
        (dict(model=model, fusion="last", feature_layers=None), "--fusion multi_layer"),
        (dict(model=small, feature_layers=(1, 1, 2), dir=tiny_dir("llava")), r"include 2, the target's final hidden"),
        (dict(model=model, feature_layers=(0, 2, 4)), "include 0"),
        (dict(model=model, feature_layers=(1, 3, 3)), "three distinct layers"),
        (dict(model=model, feature_layers=(1, 3)), "three distinct layers"),
    ]
    for i, (kw, match) in enumerate(cases):
        m, d = kw.pop("model"), kw.pop("dir", target_dir)
        _save(m, tmp_path / f"d{i}", d, **kw)
        with pytest.raises(ValueError, match=match):
            export_eagle3(tmp_path / f"d{i}", tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()  # nothing half-written

    gen_drafter = Path(mmspec.__file__).parent / "models" / "mini-gen-drafter"
    with pytest.raises(ValueError, match="drafts image codes"):
        export_eagle3(gen_drafter, tmp_path / "out_gen")
    assert not (tmp_path / "out_gen").exists()

    _save(model, tmp_path / "ok", target_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_eagle3(tmp_path / "ok", busy)
    assert (busy / "notes.txt").read_text() == "mine"

    _save(model, tmp_path / "anon", None)
    with pytest.raises(ValueError, match=r"extra\['target'\]"):
        export_eagle3(tmp_path / "anon", tmp_path / "out_anon")
    with pytest.raises(ValueError, match="does not match"):
        export_eagle3(tmp_path / "ok", tmp_path / "out_wrong", target=tiny_dir("llava"))
    with pytest.raises(FileNotFoundError, match="LM head"):
        export_eagle3(tmp_path / "ok", tmp_path / "out_missing", target=tmp_path / "no_such_model")


def test_lm_head_from_tied_or_missing_weights(target, tmp_path):
    """Only the needed tensor is read: the embedding for a tied target, a clear error when neither exists."""
    target_dir, model = target
    _save(model, tmp_path / "d", None)
    cfg = json.loads((target_dir / "config.json").read_text())
    embed_key = "language_model.model.embed_tokens.weight"
    embed = torch.randn(model.config.text_config.vocab_size, model.config.text_config.hidden_size)
    for tied in (True, False):
        fake = tmp_path / f"target_tied_{tied}"
        fake.mkdir()
        (fake / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": tied}))
        save_file({embed_key: embed, "other.weight": torch.zeros(2)}, str(fake / "model.safetensors"))
        if tied:
            out = export_eagle3(tmp_path / "d", tmp_path / "out", target=fake)
            assert torch.equal(load_file(str(out / "model.safetensors"))["lm_head.weight"], embed)
        else:
            with pytest.raises(ValueError, match="no lm_head tensor"):
                export_eagle3(tmp_path / "d", tmp_path / "out2", target=fake)


def test_cli(target, tmp_path):
    target_dir, model = target
    _save(model, tmp_path / "text", target_dir)
    _save(model, tmp_path / "vis", target_dir, vision_adaptor=True)
    cli = [sys.executable, "-m", "mmspec", "export-drafter"]
    res = subprocess.run([*cli, str(tmp_path / "text"), "--format", "eagle3", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    res = subprocess.run([*cli, str(tmp_path / "vis"), "--format", "eagle3", "--out", str(tmp_path / "out_vis")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--drop-vision-adaptor" in lines[0], res.stderr
    assert not (tmp_path / "out_vis").exists()


def test_default_feature_layers_are_distinct_and_exportable():
    """Three distinct layers for every target of 3+ layers; from 4 layers on, inside the 1..L-1 the engines capture;
    from 7 on (where it repeats no layer) EAGLE-3's own low / middle / high choice (2, L//2, L-3)."""
    assert default_feature_layers(3, "multi_layer") == (0, 1, 2)
    for n in range(3, 81):
        layers = default_feature_layers(n, "multi_layer")
        assert len(set(layers)) == 3 and all(0 <= i < n for i in layers), (n, layers)
        if n >= 4:
            assert all(1 <= i <= n - 1 for i in layers), (n, layers)
        if n >= 7:
            assert layers == (2, n // 2, n - 3)
    assert default_feature_layers(32, "last") == (32,)


@pytest.mark.parametrize("layers", [3, 4])
def test_drafters_with_default_layers_export_or_say_why(deep, tmp_path, layers):
    """The defaults of a 4-layer target export; a 3-layer target gets distinct layers too, and export names the real
    obstacle (the engines capture only layers 1..L-1) instead of complaining about repeated layers."""
    target_dir, model = deep("llava", layers)
    drafter = _save(model, tmp_path / "d", target_dir, feature_layers=None)
    assert len(set(drafter.config.feature_layers)) == 3
    if layers == 4:
        out = export_eagle3(tmp_path / "d", tmp_path / "out")
        assert json.loads((out / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    else:
        with pytest.raises(InputError, match="3 decoder layers.*1..2 only"):
            export_eagle3(tmp_path / "d", tmp_path / "out")


@pytest.mark.parametrize("family,unserved", [("llava", "vLLM and SGLang"), ("qwen2_vl", "vLLM and SGLang"),
                                              ("qwen2_5_vl", None)])
def test_engine_families_and_mrope(deep, tmp_path, caplog, family, unserved):
    """Export warns for target families an engine cannot serve with EAGLE-3; an M-RoPE target's mrope_section goes
    into rope_scaling (SGLang's trigger for 3-D positions) and rope_parameters (transformers 5)."""
    target_dir, model = deep(family, LAYERS)
    c = _save(model, tmp_path / "d", target_dir).config
    with caplog.at_level(logging.WARNING, logger="mmspec.export"):
        out = export_eagle3(tmp_path / "d", tmp_path / "out")
    cannot = [r.getMessage() for r in caplog.records if "no EAGLE-3 serving" in r.getMessage()]
    if unserved:
        assert len(cannot) == 1 and cannot[0].startswith(f"{unserved}: no EAGLE-3 serving known for {family!r}")
        assert "qwen2_5_vl (vLLM and SGLang)" in cannot[0]
    else:
        assert not cannot
    cfg = json.loads((out / "config.json").read_text())
    if family == "llava":
        assert cfg["rope_scaling"] is None
        assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": c.rope_theta}
        return
    section = model.config.get_text_config().rope_parameters["mrope_section"]
    assert cfg["rope_theta"] == c.rope_theta
    assert cfg["rope_scaling"] == {"rope_type": "default", "mrope_section": section}
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": c.rope_theta, "mrope_section": section}
    assert sum(section) * 2 == cfg["head_dim"]  # M-RoPE covers the drafter's whole rotary dimension
    llama = AutoConfig.from_pretrained(out)
    assert llama.rope_parameters["mrope_section"] == section and llama.rope_parameters["rope_theta"] == c.rope_theta


def test_truncated_files_name_the_file(target, tmp_path):
    """A truncated drafter or target safetensors file: an InputError naming it, not safetensors' bare message."""
    target_dir, model = target
    _save(model, tmp_path / "d", target_dir)
    weights = tmp_path / "d" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"model\.safetensors.*truncated"):
        export_eagle3(tmp_path / "d", tmp_path / "out")
    weights.write_bytes(whole)
    fake = tmp_path / "target"
    fake.mkdir()
    (fake / "config.json").write_text((target_dir / "config.json").read_text())
    head = (target_dir / "model.safetensors").read_bytes()
    (fake / "model.safetensors").write_bytes(head[: len(head) // 3])
    with pytest.raises(InputError, match="target.*model.safetensors.*truncated"):
        export_eagle3(tmp_path / "d", tmp_path / "out2", target=fake)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
