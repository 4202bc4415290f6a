"""Export a drafter to the EAGLE-3 checkpoint layout that vLLM and SGLang load (`LlamaForCausalLMEagle3`).

The layout (SafeAILab EAGLE-3 checkpoints, vLLM `llama_eagle3.py`, SGLang `llama_eagle3.py`):
    config.json          a LlamaConfig with architectures ["LlamaForCausalLMEagle3"], num_hidden_layers 1,
                         draft_vocab_size, and the target layers whose hidden states feed `fc`
    model.safetensors    midlayer.{input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                         mlp.{gate,up,down}_proj}.weight, norm.weight, fc.weight [H, 3H], lm_head.weight [V, H]
                         (+ d2t / t2d only for a reduced draft vocabulary, which mmspec drafters never have)
Our Drafter is already this layer (same norms, 2H-wide q/k/v over [norm(embedding) | norm(feature)], residual = the
fused feature), so the export is a renaming, plus the target's LM head, which the drafter borrows and never saves.
The engines share the target's token embedding with the draft model, so no embed_tokens is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .drafter import WEIGHTS_NAME, Drafter
from .registry import resolve_dir

logger = logging.getLogger(__name__)

# our parameter name -> EAGLE-3 checkpoint key
_RENAME = {
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
    Raises ValueError (with the reason) for drafters the engines cannot run and for a non-empty out_dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {str(out)!r} exists and is not an empty directory; choose a new --out "
                         f"(export never overwrites files)")
    drafter = Drafter.from_pretrained(drafter_dir)
    c = drafter.config
    _check_exportable(drafter, drop_vision_adaptor)
    dtype = _saved_dtype(Path(drafter_dir) / WEIGHTS_NAME)

    target_name = target if target is not None else c.extra.get("target")
    if not target_name:
        raise ValueError(
            f"the drafter in {str(drafter_dir)!r} does not record its target (config.extra['target']); pass "
            f"target=<name or directory> to mmspec.export.export_eagle3"
        )
    target_dir, target_config = _target(target_name, drafter)

    state = {k: v.detach() for k, v in drafter.state_dict().items()}
    tensors = {new: state[old].to(dtype).contiguous() for old, new in _RENAME.items()}
    tensors["fc.weight"] = _engine_fc(drafter).to(dtype).contiguous()
    # mmspec drafters predict over the target's full vocabulary: draft_vocab_size == vocab_size, and the engines take
    # an absent d2t as the identity map, so no d2t / t2d tensors are written.
    head = _target_lm_head(target_dir, target_config, c.vocab_size, c.hidden_size)
    tensors["lm_head.weight"] = head.to(dtype).contiguous()

    layers = sorted(c.feature_layers)
    text = target_config.get_text_config()
    config = {
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
        "rope_theta": c.rope_theta,
        "rope_scaling": None,  # the drafter uses plain RoPE on 1-D positions, whatever the target does
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.vocab_size,
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
        "mmspec": {"target": str(target_name), "target_model_type": c.target_model_type,
                   "feature_layers": list(c.feature_layers), "vision_adaptor_dropped": c.vision_adaptor},
    }
    _warn_mrope(text)

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info("wrote EAGLE-3 checkpoint %s (aux layers %s, %s)", out, layers, config["torch_dtype"])
    return out


def _check_exportable(drafter: Drafter, drop_vision_adaptor: bool) -> None:
    c = drafter.config
    if c.vision_adaptor and not drop_vision_adaptor:
        raise ValueError(
            "this drafter has a ViSpec vision adaptor; vLLM/SGLang cannot run the ViSpec adaptor; "
            "--drop-vision-adaptor exports the text path (image-free drafting, exact for the first draft token)"
        )
    if c.fusion != "multi_layer":
        raise ValueError(
            f"this drafter was trained with fusion={c.fusion!r} (it reads the target's final, normed hidden state); "
            f"{_NEEDS_MULTI_LAYER}, so it would see different features; train it with --fusion multi_layer"
        )
    layers = list(c.feature_layers)
    if c.target_num_layers in layers:
        raise ValueError(
            f"feature_layers {layers} include {c.target_num_layers}, the target's final hidden state after its last "
            f"norm; {_NEEDS_MULTI_LAYER} and never that one; train with --fusion multi_layer on layers "
            f"1..{c.target_num_layers - 1}"
        )
    if 0 in layers:
        raise ValueError(
            f"feature_layers {layers} include 0 (the token embeddings), which SGLang cannot address (its layer ids "
            f"name layer outputs) and vLLM captures as embeddings + a missing residual; use layers "
            f"1..{c.target_num_layers - 1}"
        )
    if len(layers) != 3 or len(set(layers)) != 3:
        raise ValueError(
            f"feature_layers {layers} must be three distinct layers: {_NEEDS_MULTI_LAYER}, capturing each layer once"
        )


def _engine_fc(drafter: Drafter) -> Tensor:
    """Our fc, rearranged to take the aux states in the engines' order, with the text-path injection folded in."""
    c, h = drafter.config, drafter.config.hidden_size
    w = drafter.fc.weight.detach().double()  # [H, 3H], column block j reads hidden_states[feature_layers[j]]
    # The engines concatenate the captured states in layer order (one pass over the layers), not in ours.
    order = sorted(range(len(c.feature_layers)), key=lambda j: c.feature_layers[j])
    w = torch.cat([w[:, j * h : (j + 1) * h] for j in order], dim=1)
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
    with safe_open(str(weights), framework="pt") as f:
        return f.get_tensor("q_proj.weight").dtype


def _target(name, drafter: Drafter):
    from transformers import AutoConfig

    try:
        path = resolve_dir(name, "target")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot find the drafter's target to copy its LM head from: {e}") from None
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    problems = drafter.mismatches(config)
    if problems:
        raise ValueError(f"the drafter does not match target {str(name)!r}: " + "; ".join(problems))
    return path, config


def _target_lm_head(path: Path, config, vocab: int, hidden: int) -> Tensor:
    """Read only the target's output projection [V, H] from its safetensors files (its input embedding when tied)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {path / f for f in weight_map.values()}
    else:
        files = set(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"target directory {str(path)!r} has no safetensors weights to read the LM head from")
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(config.get_text_config(), "tie_word_embeddings", False)
    )
    suffix = "embed_tokens.weight" if tied else "lm_head.weight"
    found = []
    for file in sorted(files):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == suffix or key.endswith("." + suffix):
                    if tuple(f.get_slice(key).get_shape()) == (vocab, hidden):
                        found.append((len(key), key, file))
    if not found:
        what = "input embedding (tie_word_embeddings)" if tied else "lm_head"
        raise ValueError(
            f"no {what} tensor of shape [{vocab}, {hidden}] (a key ending in {suffix!r}) in the safetensors files "
            f"of target {str(path)!r}"
        )
    _, key, file = min(found)  # the shortest key: the language model's own, not a nested module's
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def _warn_mrope(text_config) -> None:
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "mrope_section" in params:
        logger.warning(
            "the target uses M-RoPE; the drafter was trained on 1-D positions (the temporal row). Check that your "
            "engine gives the EAGLE-3 head the same positions after images, or acceptance will drop there"
        )
