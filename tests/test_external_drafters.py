"""Bring your own drafter: published EAGLE-3 (SpecForge / SGLang / vLLM) and EAGLE-1/2 checkpoints, written here from
their layouts alone, load through mmspec.load, compute what an independent re-implementation of their layer computes,
decode token-identically to target.generate, and draft inside their draft vocabulary; bad checkpoints are refused."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

import mmspec
from mmspec import Drafter, TreeConfig
from mmspec.draft_vocab import most_frequent
from mmspec.errors import InputError
from mmspec.export import export_eagle3
from mmspec.external_drafters import VISPEC_MISMATCH, convert, from_checkpoint
from test_export import _eagle3_forward, _randomize
from tiny_models import sample_images

LAYERS = 4  # three distinct aux layers need 4 decoder layers: SGLang ids 0..2 = hidden_states 1..3
PROMPT = "Describe the picture."
TREE = TreeConfig(depth=3, top_k=4, total_tokens=10)
HEADS, KV_HEADS, HEAD_DIM, INTER = 4, 2, 16, 96


@pytest.fixture(scope="module")
def deep(tiny_dir, tmp_path_factory):
    """family -> directory of a 4-layer random variant of a tiny family, with its processor: what mmspec.load takes."""
    built = {}

    def get(family: str):
        if family not in built:
            src = tiny_dir(family)
            config = AutoConfig.from_pretrained(src)
            tc = config.get_text_config()
            tc.num_hidden_layers = LAYERS
            if getattr(tc, "layer_types", None):
                tc.layer_types = tc.layer_types[:1] * LAYERS
            torch.manual_seed(4)
            cls = AutoModelForCausalLM if family == "text_llm" else AutoModelForImageTextToText
            path = tmp_path_factory.mktemp(f"{family}{LAYERS}")
            cls.from_config(config).save_pretrained(path)
            for f in src.iterdir():  # tokenizer, processor, generation config
                if f.name not in ("config.json", "model.safetensors"):
                    shutil.copy(f, path / f.name)
            built[family] = path
        return built[family]

    return get


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5,
            lambda n: 1 + 0.3 * torch.randn(n, generator=g))


def _llama_fields(tc) -> dict:
    return {"model_type": "llama", "hidden_size": tc.hidden_size, "intermediate_size": INTER, "num_hidden_layers": 1,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": tc.vocab_size, "max_position_embeddings": 2048}


def write_specforge(path, target_dir, draft_ids, aux_ids=(0, 1, 2), seed=0, **config_overrides):
    """An EAGLE-3 checkpoint as SpecForge saves one: reduced draft vocabulary (d2t offsets + t2d mask), its own
    embed_tokens, aux layer ids in eagle_config (SGLang numbering), bf16 weights."""
    tc = AutoConfig.from_pretrained(target_dir).get_text_config()
    h, n = tc.hidden_size, len(draft_ids)
    v = config_overrides.get("vocab_size", tc.vocab_size)  # a drafter made for another vocabulary is consistent in itself
    w, gain = _weights(seed)
    m = "midlayer."
    t = {m + "input_layernorm.weight": gain(h), m + "hidden_norm.weight": gain(h),
         m + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, 2 * h), m + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, 2 * h),
         m + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, 2 * h), m + "self_attn.o_proj.weight": w(h, HEADS * HEAD_DIM),
         m + "post_attention_layernorm.weight": gain(h), m + "mlp.gate_proj.weight": w(INTER, h),
         m + "mlp.up_proj.weight": w(INTER, h), m + "mlp.down_proj.weight": w(h, INTER), "norm.weight": gain(h),
         "fc.weight": w(h, 3 * h), "lm_head.weight": 4 * w(n, h), "embed_tokens.weight": w(v, h) * h**0.5}
    if config_overrides.get("fc_norm"):
        t.update({f"fc_norm.{j}.weight": gain(h) for j in range(3)})
    t = {k: x.to(torch.bfloat16).contiguous() for k, x in t.items()}
    ids = torch.tensor(sorted(draft_ids))
    t["d2t"] = ids - torch.arange(n)
    t["t2d"] = torch.zeros(v, dtype=torch.bool).index_fill(0, ids, True)
    config = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(tc), "vocab_size": v, "draft_vocab_size": n,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False,
              "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(aux_ids)},
              **config_overrides}
    path.mkdir(parents=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_eagle2(path, target_dir, seed=0, pickle=False):
    """An EAGLE-1/2 checkpoint (SafeAILab layout): fc [H, 2H] with bias, layers.0 without an input norm, embed_tokens."""
    tc = AutoConfig.from_pretrained(target_dir).get_text_config()
    h = tc.hidden_size
    w, gain = _weights(seed)
    p = "layers.0."
    t = {"fc.weight": w(h, 2 * h), "fc.bias": 0.1 * w(1, h)[0], "embed_tokens.weight": w(tc.vocab_size, h) * h**0.5,
         p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, h), p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, h),
         p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, h), p + "self_attn.o_proj.weight": w(h, HEADS * HEAD_DIM),
         p + "post_attention_layernorm.weight": gain(h), p + "mlp.gate_proj.weight": w(INTER, h),
         p + "mlp.up_proj.weight": w(INTER, h), p + "mlp.down_proj.weight": w(h, INTER)}
    path.mkdir(parents=True)
    if pickle:
        torch.save(t, path / "pytorch_model.bin")
    else:
        save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **_llama_fields(tc), "bias": True}))
    return path


def _eagle2_forward(t: dict, cfg: dict, embeds, feats, positions, head):
    """EAGLE-1/2's layer from the checkpoint alone: fc([embedding | feature]) + bias, a Llama layer with no input
    norm, the target's LM head with no norm. embeds, feats [n, H] -> (hidden [n, H], logits [n, V])."""
    eps, theta, nh, nkv, hd = cfg["rms_norm_eps"], cfg["rope_theta"], HEADS, KV_HEADS, HEAD_DIM
    n, p = embeds.shape[0], "layers.0."
    x = torch.cat([embeds, feats], -1) @ t["fc.weight"].T + t["fc.bias"]
    ang = positions[:, None].double() / theta ** (torch.arange(0, hd, 2).double() / hd)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rope = lambda z: z * cos + torch.cat([-z[..., hd // 2:], z[..., : hd // 2]], -1) * sin  # noqa: E731
    q = rope((x @ t[p + "self_attn.q_proj.weight"].T).view(n, nh, hd).transpose(0, 1))
    k = rope((x @ t[p + "self_attn.k_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
    v = (x @ t[p + "self_attn.v_proj.weight"].T).view(n, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    s = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    h = x + (s.softmax(-1) @ v).transpose(0, 1).reshape(n, nh * hd) @ t[p + "self_attn.o_proj.weight"].T
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * t[p + "post_attention_layernorm.weight"]
    mlp = (F.silu(y @ t[p + "mlp.gate_proj.weight"].T) * (y @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    h = h + mlp
    return h, h @ head.T


def _states(target, n=9, seed=3):
    """Random target hidden states (the transformers tuple, L + 1 entries) and tokens."""
    tc = target.config.get_text_config()
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(1, n, tc.hidden_size, generator=g) for _ in range(tc.num_hidden_layers + 1)]
    return states, torch.randint(0, tc.vocab_size, (1, n), generator=g), torch.arange(5, 5 + n)[None]


@pytest.mark.parametrize("specforge_flags", [{}, {"fc_norm": True, "norm_output": False}])
def test_specforge_eagle3_computes_the_engines_layer(deep, tmp_path, specforge_flags):
    """The loaded drafter equals the engines' EAGLE-3 forward over the checkpoint: its own embedding, fc over the aux
    states SGLang captures for eagle_config ids [0, 1, 2] (the outputs of layers 0..2 = hidden_states 1..3), the draft
    head, and d2t mapping draft ids to target ids; with SpecForge's fc_norm (an RMSNorm per aux state before fc) and
    norm_output=false (logits from the un-normed output)."""
    target_dir = deep("llava")
    model = AutoModelForImageTextToText.from_pretrained(target_dir).eval()
    draft_ids = list(range(40, 200, 3))
    ck = write_specforge(tmp_path / "ck", target_dir, draft_ids, **specforge_flags)
    d = from_checkpoint(ck, model.config).bind(model).eval()
    assert d.config.feature_layers == (1, 2, 3) and d.config.draft_vocab_size == len(draft_ids)
    t = {k: v.double() for k, v in load_file(str(ck / "model.safetensors")).items() if v.is_floating_point()}
    cfg = json.loads((ck / "config.json").read_text())
    states, tokens, positions = _states(model)
    with torch.no_grad():
        ours = d(tokens, d.fuse(states), positions, None, None)
        logits = d.logits(ours)[0]
        aux = [states[i + 1][0].double() for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
        if specforge_flags:
            aux = [a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * t[f"fc_norm.{j}.weight"]
                   for j, a in enumerate(aux)]
        theirs, their_logits = _eagle3_forward(t, cfg, t["embed_tokens.weight"][tokens[0]], torch.cat(aux, -1),
                                               positions[0])
        if specforge_flags:
            their_logits = theirs @ t["lm_head.weight"].T
    torch.testing.assert_close(ours[0], theirs.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, their_logits.float(), rtol=1e-4, atol=1e-4)
    assert d.target_ids(logits.argmax(-1)).tolist() == [draft_ids[i] for i in their_logits.argmax(-1).tolist()]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_specforge_eagle3_decodes_losslessly_inside_its_draft_vocabulary(deep, tmp_path, family):
    target_dir = deep(family)
    probe = mmspec.load(target_dir, "untrained", device="cpu", tree=TREE)
    images = sample_images(1)
    inputs = probe.prepare(PROMPT, images)
    ref = probe.target.generate(**inputs, do_sample=False, max_new_tokens=20)[0, inputs["input_ids"].shape[1]:].tolist()
    # the draft vocabulary: half the target's own output plus ids it never emits, so mapping errors show
    draft_ids = sorted(set(ref[::2]) | set(range(300, 380, 2)))
    ck = write_specforge(tmp_path / "ck", target_dir, draft_ids)
    pipe = mmspec.load(target_dir, ck, device="cpu", tree=TREE)
    assert pipe.drafter.config.draft_vocab_size == len(draft_ids) and pipe.drafter.draft_embed is not None
    trees, out = [], []
    for ev in pipe.stream(PROMPT, images, max_new_tokens=20):
        out.extend(ev.token_ids)
        if ev.tree is not None:
            trees.append(ev.tree)
    assert out == ref
    drafted = torch.cat([tr.tokens[1:] for tr in trees]).tolist()
    assert drafted and set(drafted) <= set(draft_ids)
    assert len(set(drafted)) > 1  # the map spreads the drafts over the vocabulary


def test_eagle2_checkpoint_on_a_tiny_llama(deep, tmp_path):
    target_dir = deep("text_llm")
    ck = write_eagle2(tmp_path / "ck", target_dir)
    pipe = mmspec.load(target_dir, ck, device="cpu", tree=TREE, draft_dtype="float32")
    d, model = pipe.drafter, pipe.target
    assert d.config.layer == "eagle2" and d.config.feature_layers == (LAYERS,) and d.config.fc_bias
    t = {k: v.double() for k, v in load_file(str(ck / "model.safetensors")).items()}
    states, tokens, positions = _states(model)
    with torch.no_grad():
        ours = d(tokens, d.fuse(states), positions, None, None)
        theirs, their_logits = _eagle2_forward(t, json.loads((ck / "config.json").read_text()),
                                               t["embed_tokens.weight"][tokens[0]], states[LAYERS][0].double(),
                                               positions[0], model.lm_head.weight.double())
        torch.testing.assert_close(ours[0], theirs.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d.logits(ours)[0], their_logits.float(), rtol=1e-4, atol=1e-4)
    inputs = pipe.prepare(PROMPT)
    ref = model.generate(**inputs, do_sample=False, max_new_tokens=24)[0, inputs["input_ids"].shape[1]:].tolist()
    assert pipe.generate(PROMPT, max_new_tokens=24).token_ids == ref


def test_round_trip_through_the_eagle3_export_proposes_the_same_trees(deep, tmp_path):
    """mmspec multi-layer drafter (reduced draft vocabulary) -> EAGLE-3 export -> loaded back: the same trees, token
    for token, every step (greedy, same target, same tree shape)."""
    target_dir = deep("llava")
    model = AutoModelForImageTextToText.from_pretrained(target_dir).eval()
    ids = most_frequent(torch.arange(model.config.text_config.vocab_size) % 7, 96)  # any 96 ids, not 0..95
    drafter = _randomize(Drafter.for_target(model, vision_adaptor=False, feature_layers=(3, 1, 2), draft_vocab=ids))
    drafter.config.extra["target"] = str(target_dir)
    drafter.save_pretrained(tmp_path / "ours")
    out = export_eagle3(tmp_path / "ours", tmp_path / "eagle3")
    exported = load_file(str(out / "model.safetensors"))
    assert exported["lm_head.weight"].shape[0] == 96 and exported["t2d"].sum() == 96
    images = sample_images(1)
    runs = []
    for src in (tmp_path / "ours", out):
        pipe = mmspec.load(target_dir, src, device="cpu", tree=TREE, draft_dtype="float32")
        runs.append([(ev.tree.tokens.tolist(), ev.tree.parents.tolist()) for ev in pipe.stream(PROMPT, images,
                     max_new_tokens=16) if ev.tree is not None])
    assert pipe.drafter.config.extra["layout"] == "eagle3" and pipe.drafter.config.feature_layers == (1, 2, 3)
    assert len(runs[0]) > 2 and runs[0] == runs[1]


def test_aux_layer_numbering_and_defaults(deep, tmp_path):
    """vLLM's top-level ids name layer inputs, SGLang's eagle_config ids layer outputs; both present must agree;
    neither: the engines' default hidden_states (2, L // 2, L - 3) of a 4-layer target is (2, 2, 1): refused."""
    target_dir = deep("llava")
    config = AutoConfig.from_pretrained(target_dir)
    ids = [5, 9, 11]
    sglang = lambda layers: {"eagle_config": {"eagle_aux_hidden_state_layer_ids": layers}}  # noqa: E731
    cases = [({"eagle_aux_hidden_state_layer_ids": [3, 1, 2]}, (1, 2, 3)),
             ({"eagle_aux_hidden_state_layer_ids": [1, 2, 3], **sglang([0, 1, 2])}, (1, 2, 3))]
    for i, (over, want) in enumerate(cases):
        ck = write_specforge(tmp_path / f"ok{i}", target_dir, ids, **over)
        assert from_checkpoint(ck, config).config.feature_layers == want
    bad = [({"eagle_aux_hidden_state_layer_ids": [1, 2, 3], **sglang([1, 2, 3])}, "disagree"),
           ({"eagle_config": {}}, r"default \(2, L // 2, L - 3\) give hidden states \[2, 2, 1\]"),
           ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}}, r"outside the 0..3")]
    for i, (over, match) in enumerate(bad):
        ck = write_specforge(tmp_path / f"bad{i}", target_dir, ids, **over)
        with pytest.raises(InputError, match=match):
            from_checkpoint(ck, config)


def test_bad_checkpoints_are_refused_by_name(deep, tiny_dir, tmp_path):
    llava, llama = deep("llava"), deep("text_llm")
    config = AutoConfig.from_pretrained(llava)
    ids = [5, 9, 11]
    cases = {
        "hidden size 32 vs target 64": write_specforge(tmp_path / "wide", llava, ids, target_hidden_size=32),
        "vocabulary 600 vs target": write_specforge(tmp_path / "vocab", llava, ids, vocab_size=600),
        "q_proj has 64 output rows, but config.json says 8 heads": write_specforge(tmp_path / "heads", llava, ids,
                                                                                  num_attention_heads=8),
        "rope type 'llama3'": write_specforge(tmp_path / "rope", llava, ids, rope_scaling={"rope_type": "llama3"}),
    }
    for match, ck in cases.items():
        with pytest.raises(InputError, match=match):
            from_checkpoint(ck, config)
    trunc = write_specforge(tmp_path / "trunc", llava, ids)
    whole = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated"):
        from_checkpoint(trunc, config)
    extra = write_specforge(tmp_path / "extra", llava, ids)
    save_file({"midlayer.self_attn.q_norm.weight": torch.ones(4)}, str(extra / "more.safetensors"))
    with pytest.raises(InputError, match="would not use.*q_norm"):
        from_checkpoint(extra, config)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"]}))
    save_file({"medusa_head.0.weight": torch.zeros(2, 2)}, str(unknown / "model.safetensors"))
    with pytest.raises(InputError, match="unknown drafter layout"):
        from_checkpoint(unknown, config)
    vispec = write_eagle2(tmp_path / "vispec", llava)
    save_file({"imadpt.q": torch.zeros(2, 4, 16), "img_fc.weight": torch.zeros(64, 128)}, str(vispec / "vis.safetensors"))
    with pytest.raises(InputError, match="does not map exactly"):
        from_checkpoint(vispec, config)
    e2 = write_eagle2(tmp_path / "e2", llama, seed=1)
    cfg = json.loads((e2 / "config.json").read_text())
    (e2 / "config.json").write_text(json.dumps({**cfg, "vocab_size": 600}))  # an EAGLE-1/2 drafter for another vocab
    with pytest.raises(InputError, match="vocabulary 600 vs target 512"):
        mmspec.load(tiny_dir("llava"), e2, device="cpu")
    assert "mismatch" not in VISPEC_MISMATCH  # the refusal states the reasons, see README


def test_pickles_only_with_the_opt_in(deep, tmp_path):
    target_dir = deep("text_llm")
    ck = write_eagle2(tmp_path / "bin", target_dir, pickle=True)
    with pytest.raises(InputError, match="trust_pickle=True"):
        mmspec.load(target_dir, ck, device="cpu")
    pipe = mmspec.load(target_dir, ck, device="cpu", trust_pickle=True, tree=TREE)
    assert pipe.drafter.config.layer == "eagle2"


def test_cli_convert_and_export_with_target(deep, tmp_path, capsys):
    """In-process `mmspec ...` (the subprocess entry point is tested in test_export): exit 2 and one line for a bad
    input, nothing written; a converted drafter loads and decodes losslessly; export takes --target."""
    from mmspec.cli import main

    llava, llama = deep("llava"), deep("text_llm")

    def run(*args) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err.strip()

    e2 = write_eagle2(tmp_path / "e2", llama, pickle=True)
    code, err = run("convert-drafter", e2, "--out", tmp_path / "no")
    assert code == 2 and len(err.splitlines()) == 1 and "--trust-pickle" in err
    code, err = run("convert-drafter", e2, "--out", tmp_path / "no2", "--trust-pickle")  # EAGLE-1/2 needs its target
    assert code == 2 and len(err.splitlines()) == 1 and "(--target)" in err
    assert not (tmp_path / "no").exists() and not (tmp_path / "no2").exists()
    code, err = run("convert-drafter", e2, "--out", tmp_path / "conv", "--trust-pickle", "--target", llama)
    assert code == 0, err
    pipe = mmspec.load(llama, tmp_path / "conv", device="cpu", tree=TREE)
    inputs = pipe.prepare(PROMPT)
    ref = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
    assert pipe.generate(PROMPT, max_new_tokens=12).token_ids == ref
    # an EAGLE-3 checkpoint that names its layers converts without a target; exporting it back needs one
    convert(write_specforge(tmp_path / "e3", llava, [5, 9, 11]), tmp_path / "conv3")
    code, err = run("export-drafter", tmp_path / "conv3", "--format", "eagle3", "--out", tmp_path / "x")
    assert code == 2 and "--target NAME_OR_DIR" in err and not (tmp_path / "x").exists()
    code, err = run("export-drafter", tmp_path / "conv3", "--format", "eagle3", "--out", tmp_path / "x", "--target", llava)
    assert code == 0, err
    back = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert back["d2t"].tolist() == [5 - 0, 9 - 1, 11 - 2] and "embed_tokens.weight" in back
