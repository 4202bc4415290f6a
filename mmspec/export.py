"""Export a drafter to the EAGLE-3 checkpoint layout that vLLM and SGLang load (`LlamaForCausalLMEagle3`).

The layout (SafeAILab EAGLE-3 checkpoints, vLLM `llama_eagle3.py`, SGLang `llama_eagle3.py`):
    config.json          a LlamaConfig with architectures ["LlamaForCausalLMEagle3"], num_hidden_layers 1,
                         draft_vocab_size, and the target layers whose hidden states feed `fc`
    model.safetensors    midlayer.{input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                         mlp.{gate,up,down}_proj}.weight, norm.weight, fc.weight [H, 3H], lm_head.weight [V, H]
                         (+ d2t [N] int64 / t2d [V] bool for a reduced draft vocabulary, with lm_head [N, H];
                         + embed_tokens [V, H] for a drafter with its own embedding)
Our Drafter is already this layer (same norms, 2H-wide q/k/v over [norm(embedding) | norm(feature)], residual = the
fused feature), so the export is a renaming, plus the target's LM head, which the drafter borrows and never saves
(a drafter with a reduced draft vocabulary has its own head and token map instead). The engines share the target's
token embedding with the draft model, so no embed_tokens is written unless the drafter has its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .drafter import WEIGHTS_NAME, Drafter
from .errors import InputError, MissingInputError
from .registry import target_config

logger = logging.getLogger(__name__)

# our parameter name -> EAGLE-3 checkpoint key
EAGLE3_KEYS = {
    "input_norm.weight": "midlayer.input_layernorm.weight",  # applied to the token embedding
    "hidden_norm.weight": "midlayer.hidden_norm.weight",  # applied to the fused feature
    "q_proj.weight": "midlayer.self_attn.q_proj.weight",
    "k_proj.weight": "midlayer.self_attn.k_proj.weight",
    "v_proj.weight": "midlayer.self_attn.v_proj.weight",
    "o_proj.weight": "midlayer.self_attn.o_proj.weight",
    "post_norm.weight": "midlayer.post_attention_layernorm.weight",
    "gate_proj.weight": "midlayer.mlp.gate_proj.weight",
    "up_proj.weight": "midlayer.mlp.up_proj.weight",
    "down_proj.weight": "midlayer.mlp.down_proj.weight",
    "norm.weight": "norm.weight",
}
_NEEDS_MULTI_LAYER = (
    "vLLM and SGLang feed the drafter pre-norm hidden states of three target layers through fc (3H -> H)"
)
# The vision-language families whose target class runs an EAGLE-3 head in each engine, read from their sources: vLLM
# needs the class to declare SupportsEagle3 (its LLaVA, LLaVA-NeXT and Qwen2-VL classes do not: "Model does not support
# EAGLE3 interface"; Mistral3 does in recent versions), SGLang needs set_eagle3_layers_to_capture (added for
# Qwen2.5-VL; not found for the others). Text LMs (Llama, Qwen2, ...) are served by both and need no entry.
ENGINE_FAMILIES = {"qwen2_5_vl": ("vLLM", "SGLang"), "mistral3": ("vLLM",)}
ENGINES = ("vLLM", "SGLang")


def export_eagle3(
    drafter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    drop_vision_adaptor: bool = False,
    target: str | os.PathLike | None = None,
) -> Path:
    """Write `drafter_dir` (a Drafter.save_pretrained directory) as an EAGLE-3 checkpoint in `out_dir` -> out_dir.

    target: the target model the drafter was trained for (built-in name, directory or cached Hugging Face id); default
    the one recorded at training time in config.extra["target"]. Only its LM head tensor is read.
    drop_vision_adaptor: export a ViSpec drafter's text path (the engines cannot run the adaptor).
    Raises InputError (a ValueError, with the reason) for drafters the engines cannot run and for a non-empty out_dir;
    logs a warning for targets that an engine cannot serve with an EAGLE-3 head."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {str(out)!r} exists and is not an empty directory; choose a new --out "
                         f"(export never overwrites files)")
    drafter = Drafter.from_pretrained(drafter_dir)
    c = drafter.config
    _check_exportable(drafter, drop_vision_adaptor, c.target_num_layers)
    dtype = _saved_dtype(Path(drafter_dir) / WEIGHTS_NAME)

    target_name = target if target is not None else c.extra.get("target")
    if not target_name:
        raise InputError(
            f"the drafter in {str(drafter_dir)!r} does not record its target (config.extra['target']); pass "
            f"--target NAME_OR_DIR (target= in Python)"
        )
    target_dir, target_config = _target(target_name, drafter)
    if not c.target_num_layers:  # a converted checkpoint that did not record its target: check against this one
        _check_exportable(drafter, drop_vision_adaptor, target_config.get_text_config().num_hidden_layers)

    state = {k: v.detach() for k, v in drafter.state_dict().items()}
    tensors = {new: state[old].to(dtype).contiguous() for old, new in EAGLE3_KEYS.items()}
    tensors["fc.weight"] = _engine_fc(drafter).to(dtype).contiguous()
    tensors.update(_head_tensors(drafter, target_dir, target_config, dtype))

    config = _engine_config(c, target_config, str(target_name), dtype)
    _warn_unserved(target_config)
    _warn_mrope(target_config.get_text_config())

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info("wrote EAGLE-3 checkpoint %s (aux layers %s, %s)", out, config["eagle_aux_hidden_state_layer_ids"],
                config["torch_dtype"])
    return out


def _head_tensors(drafter: Drafter, target_dir: Path, target_config, dtype: torch.dtype) -> dict[str, Tensor]:
    """lm_head (+ d2t / t2d, + embed_tokens). A full-vocabulary drafter borrows the target's head, and the engines
    take an absent d2t as the identity map, so none is written for it."""
    c, out = drafter.config, {}
    if drafter.draft_head is None:
        head = _target_lm_head(target_dir, target_config, c.vocab_size, c.hidden_size)
    else:
        from .draft_vocab import mask

        head = drafter.draft_head.weight.detach()
        out["d2t"] = drafter.d2t.detach().long().contiguous()
        out["t2d"] = mask(drafter.draft_token_ids.cpu(), c.vocab_size)
    out["lm_head.weight"] = head.to(dtype).contiguous()
    if drafter.draft_embed is not None:
        out["embed_tokens.weight"] = drafter.draft_embed.weight.detach().to(dtype).contiguous()
    return out


def _engine_config(c, target_config, target_name: str, dtype: torch.dtype) -> dict:
    """The config.json of the EAGLE-3 checkpoint: a one-layer LlamaConfig plus the engines' aux-layer keys."""
    layers = sorted(c.feature_layers)
    text = target_config.get_text_config()
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        **_rope_fields(c.rope_theta, text),
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size or c.vocab_size,
        **({"target_hidden_size": c.target_hidden_size} if c.target_hidden_size else {}),
        "max_position_embeddings": int(getattr(text, "max_position_embeddings", None) or 2048),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # The two engines number the aux layers differently. vLLM (top-level key, read first) captures the input of
        # decoder layer i = transformers' hidden_states[i], our own numbering. SGLang reads eagle_config and captures
        # the OUTPUT of layer i (input of layer i + 1) = hidden_states[i + 1]. Writing each engine its own numbering
        # makes both read the layers this drafter was trained on.
        "eagle_aux_hidden_state_layer_ids": layers,
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [i - 1 for i in layers]},
        # provenance only; the engines ignore unknown keys
        "mmspec": {"target": target_name, "target_model_type": c.target_model_type,
                   "feature_layers": list(c.feature_layers), "vision_adaptor_dropped": c.vision_adaptor},
    }


def _mrope_section(text_config) -> list[int] | None:
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    return [int(x) for x in section] if section else None


def _rope_fields(theta: float, text_config) -> dict:
    """The drafter's RoPE in both spellings: rope_theta + rope_scaling (transformers 4 and the engines' loaders) and
    rope_parameters (transformers 5, where rope_scaling is only an alias).

    The drafter rotates by the 1-D temporal row of the target's positions. For an M-RoPE target (Qwen2-VL, 2.5-VL) the
    target's mrope_section goes into rope_scaling: SGLang's EAGLE-3 head reads 3-D positions (with the prompt's rope
    delta) only when it finds one there, and otherwise numbers the text after an image differently from the target.
    For text tokens the three rows are equal, so M-RoPE over them is exactly the drafter's 1-D rotation."""
    section = _mrope_section(text_config)
    params = {"rope_type": "default", "rope_theta": theta}
    if section is None:
        return {"rope_theta": theta, "rope_scaling": None, "rope_parameters": params}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": "default", "mrope_section": section},
            "rope_parameters": {**params, "mrope_section": section}}


def _warn_unserved(target_config) -> None:
    """Warn when an engine cannot serve this target family with an EAGLE-3 head (the export itself is still valid)."""
    if getattr(target_config, "vision_config", None) is None:
        return  # text LMs: both engines capture aux states for the common families
    served = ENGINE_FAMILIES.get(target_config.model_type, ())
    missing = [e for e in ENGINES if e not in served]
    if missing:
        logger.warning(
            "%s: no EAGLE-3 serving known for %r targets (the engine's class for the family must capture the "
            "target's hidden states; vLLM otherwise stops with \"Model does not support EAGLE3 interface\"). The "
            "export is written; known to serve: %s", " and ".join(missing), target_config.model_type,
            ", ".join(f"{k} ({' and '.join(v)})" for k, v in ENGINE_FAMILIES.items()) + " and text LMs",
        )


def _check_exportable(drafter: Drafter, drop_vision_adaptor: bool, n_layers: int) -> None:
    """n_layers: the target's decoder layers (0: not known yet, the layer checks wait for the target)."""
    c = drafter.config
    if c.modality == "image":
        raise InputError(
            "this drafter drafts image codes for an AR image generator (modality 'image': the target's generation "
            "embeddings and head, CFG rows); vLLM's and SGLang's EAGLE-3 serve text drafters only, so there is no "
            "layout to export it to"
        )
    if c.vision_adaptor and not drop_vision_adaptor:
        raise InputError(
            "this drafter has a ViSpec vision adaptor; vLLM/SGLang cannot run the ViSpec adaptor; "
            "--drop-vision-adaptor exports the text path (image-free drafting, exact for the first draft token)"
        )
    if c.layer != "eagle3":
        raise InputError(f"this drafter has an {c.layer} layer (EAGLE-1/2: fc over [embedding | feature] into a plain "
                         f"layer); the EAGLE-3 layout holds EAGLE-3's layer only")
    if not c.head_norm or c.fc_norm:
        raise InputError("this drafter applies no norm before its head, or norms each feature before fc (SpecForge's "
                         "norm_output=false / fc_norm); vLLM's and SGLang's EAGLE-3 layer computes neither")
    if c.fusion != "multi_layer":
        raise InputError(
            f"this drafter was trained with fusion={c.fusion!r} (it reads the target's final, normed hidden state); "
            f"{_NEEDS_MULTI_LAYER}, so it would see different features; train it with --fusion multi_layer"
        )
    layers = list(c.feature_layers)
    if not n_layers:
        return
    if n_layers in layers:
        raise InputError(
            f"feature_layers {layers} include {n_layers}, the target's final hidden state after its last "
            f"norm; {_NEEDS_MULTI_LAYER} and never that one; train with --fusion multi_layer on layers "
            f"1..{n_layers - 1}"
        )
    if n_layers < 4:
        raise InputError(
            f"the target has {n_layers} decoder layers; vLLM and SGLang capture the inputs of layers "
            f"1..{n_layers - 1} only, too few for the three distinct feature layers their EAGLE-3 reads "
            f"(a target this shallow cannot be served with an EAGLE-3 drafter)"
        )
    if 0 in layers:
        raise InputError(
            f"feature_layers {layers} include 0 (the token embeddings), which neither engine captures (SGLang's "
            f"layer ids name layer outputs; vLLM adds a residual that does not exist before layer 0); use layers "
            f"1..{n_layers - 1}"
        )
    if len(layers) != 3 or len(set(layers)) != 3:
        raise InputError(
            f"feature_layers {layers} must be three distinct layers: {_NEEDS_MULTI_LAYER}, capturing each layer once"
        )


def _engine_fc(drafter: Drafter) -> Tensor:
    """Our fc, rearranged to take the aux states in the engines' order, with the text-path injection folded in."""
    c, h = drafter.config, drafter.config.hidden_size
    th = c.target_hidden_size or h  # the width of each target feature
    w = drafter.fc.weight.detach().double()  # [H, 3 th], column block j reads hidden_states[feature_layers[j]]
    # The engines concatenate the captured states in layer order (one pass over the layers), not in ours.
    order = sorted(range(len(c.feature_layers)), key=lambda j: c.feature_layers[j])
    w = torch.cat([w[:, j * th : (j + 1) * th] for j in order], dim=1)
    if drafter.inject is not None:
        # ViSpec injection: f' = W [f | image_vec]. Without images image_vec = 0, so f' = W[:, :H] f =
        # (W[:, :H] fc) aux: exact for every position that reads the target's features. Deeper drafts feed the
        # drafter's own prediction back, which our drafter also passes through W[:, :H] and the engines cannot (their
        # layer feeds its output straight back); report how far W[:, :H] is from the identity.
        a = drafter.inject.weight.detach().double()[:, :h]
        w = a @ w
        dev = (torch.linalg.matrix_norm(a - torch.eye(h, dtype=a.dtype)) / h**0.5).item()
        if dev > 1e-3:
            logger.warning(
                "dropped the vision adaptor: the injection's feature block is %.3g (relative Frobenius) from the "
                "identity, so drafts beyond depth 1 are approximate in vLLM/SGLang", dev,
            )
    return w


def _saved_dtype(weights: Path) -> torch.dtype:
    with _safe_open(weights) as f:
        return f.get_tensor("q_proj.weight").dtype


def _safe_open(file: Path):
    """safe_open, with an InputError naming the file when it is truncated or unreadable (safetensors' own message
    names no file)."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise InputError(f"{str(file)!r} is not a complete safetensors file ({e}); it may be truncated or corrupt") from None
    except OSError as e:
        raise InputError(f"cannot read {str(file)!r}: {e.strerror or e}") from None


def _target(name, drafter: Drafter):
    try:
        path, config = target_config(name)
    except MissingInputError as e:
        raise MissingInputError(f"cannot find the drafter's target to copy its LM head from: {e}") from None
    problems = drafter.mismatches(config)
    if problems:
        raise InputError(f"the drafter does not match target {str(name)!r}: " + "; ".join(problems))
    return path, config


def _target_lm_head(path: Path, config, vocab: int, hidden: int) -> Tensor:
    """Read only the target's output projection [V, H] from its safetensors files (its input embedding when tied)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = {path / f for f in json.loads(index.read_text())["weight_map"].values()}
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise InputError(f"cannot read the weight map {str(index)!r}: {e}") from None
    else:
        files = set(path.glob("*.safetensors"))
    if not files:
        raise MissingInputError(f"target directory {str(path)!r} has no safetensors weights to read the LM head from")
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(config.get_text_config(), "tie_word_embeddings", False)
    )
    suffix = "embed_tokens.weight" if tied else "lm_head.weight"
    found = []
    for file in sorted(files):
        with _safe_open(file) as f:
            for key in f.keys():
                if key == suffix or key.endswith("." + suffix):
                    if tuple(f.get_slice(key).get_shape()) == (vocab, hidden):
                        found.append((len(key), key, file))
    if not found:
        what = "input embedding (tie_word_embeddings)" if tied else "lm_head"
        raise InputError(
            f"no {what} tensor of shape [{vocab}, {hidden}] (a key ending in {suffix!r}) in the safetensors files "
            f"of target {str(path)!r}"
        )
    _, key, file = min(found)  # the shortest key: the language model's own, not a nested module's
    with _safe_open(file) as f:
        return f.get_tensor(key)


def _warn_mrope(text_config) -> None:
    if _mrope_section(text_config) is not None:
        logger.warning(
            "the target uses M-RoPE: its mrope_section is in the export's rope_scaling, so text positions match the "
            "target's; image tokens are rotated by their height/width rows there, where the drafter saw the temporal "
            "row, so drafts right after an image may be accepted less often than in mmspec"
        )
