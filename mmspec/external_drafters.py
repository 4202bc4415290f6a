"""Published drafter checkpoints -> mmspec Drafters, recognised from config.json and the tensor names.

Layouts (the conventions were read in the engines' own sources; tests/test_external_drafters.py pins them):
- "eagle3": EAGLE-3 as SpecForge trains it and SGLang / vLLM serve it. architectures LlamaForCausalLMEagle3 (SGLang,
  SpecForge) or Eagle3LlamaForCausalLM (vLLM); one layer `midlayer.*` (vLLM's loader also accepts `layers.0.*`), `fc`
  [H, 3 * target_hidden_size], `norm`, `lm_head` [draft_vocab_size, H], `d2t` / `t2d` for a reduced draft vocabulary,
  optional `embed_tokens` (else the target's), optional SpecForge `fc_norm` / `norm_output` flags. Its aux layers:
    top-level eagle_aux_hidden_state_layer_ids  vLLM numbering: id i = the input of decoder layer i = hidden_states[i]
    eagle_config.eagle_aux_hidden_state_layer_ids  SGLang numbering: id i = the output of layer i = hidden_states[i+1]
                                                   (SGLang captures layers_to_capture = [i + 1 for i in ids])
    neither                                     both engines' default: hidden_states[2, L // 2, L - 3] (SpecForge
                                                   writes the same as [1, L // 2 - 1, L - 4] in SGLang numbering)
  The engines concatenate the captured states in layer order, so fc's column blocks follow ascending layers.
- "eagle2": EAGLE-1/2 (SafeAILab): `fc` [H, 2H] over [embedding | feature] with or without bias, `layers.0.*` without
  an input norm, `embed_tokens`; the feature is the target's final (normed) hidden state, the head the target's.
- "vispec": recognised (`imadpt.*`, `img_fc`) and refused, with the reasons: see VISPEC_MISMATCH.
Weights load from safetensors; a pickle (pytorch_model.bin) only with trust_pickle=True, never by default.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from .draft_vocab import ids_from_map
from .drafter import CONFIG_NAME, Drafter, DrafterConfig, read_weights
from .errors import InputError, MissingInputError
from .export import EAGLE3_KEYS

logger = logging.getLogger(__name__)

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
VISPEC_MISMATCH = (
    "ViSpec's released layout (imadpt.*, img_fc, an EAGLE-2 layer) does not map exactly onto mmspec's ViSpec "
    "drafter: its adaptor attends over the image embeddings without normalising them (mmspec's normalises first), its "
    "image slots replace the layer input after fc (mmspec's replace the token embedding before the layer), and its "
    "img_fc has a bias (mmspec's injection has none); mmspec refuses it rather than draft from different features"
)
# EAGLE-1/2 checkpoint key -> our parameter (the rest of the layer is named as in EAGLE-3, under layers.0.)
_EAGLE2_KEYS = {"fc.weight": "embed_fc.weight", "fc.bias": "embed_fc.bias"}
_EAGLE2_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight")
_IGNORED = ("rotary_emb.inv_freq",)  # old checkpoints save the RoPE table; it is recomputed from rope_theta


def is_mmspec_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def load_drafter(path: str | os.PathLike, target, *, trust_pickle: bool = False) -> Drafter:
    """Any drafter directory (mmspec's own or a published layout) -> a Drafter bound to `target` (the model)."""
    path = Path(path)
    if is_mmspec_dir(path):
        return Drafter.from_pretrained(path, target)
    return from_checkpoint(path, target.config, trust_pickle=trust_pickle).bind(target)


def from_checkpoint(path: str | os.PathLike, target_config=None, *, trust_pickle: bool = False) -> Drafter:
    """A published checkpoint directory -> an unbound Drafter, checked against `target_config` (a transformers config)
    when given. Without it, only an EAGLE-3 checkpoint that names its aux layers can be read (nothing else says
    which target layers the drafter reads)."""
    path = Path(path)
    config, tensors = read_checkpoint(path, trust_pickle)
    layout = detect_layout(path, config, tensors)
    where = str(path)
    if layout == "vispec":
        raise InputError(f"{where}: {VISPEC_MISMATCH}")
    build = _eagle3 if layout == "eagle3" else _eagle2
    drafter_config, state = build(where, config, tensors, target_config)
    _check_heads(where, drafter_config, state)
    drafter = Drafter(drafter_config)
    try:
        drafter.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a tensor of the wrong shape: name it (nothing is half-loaded, the drafter is dropped)
        raise InputError(f"{where}: the tensors do not fit the config: {' '.join(str(e).split())}") from None
    drafter.config.extra.update(layout=layout, source=where)
    logger.info("loaded a %s drafter from %s (feature layers %s, draft vocabulary %s)", layout, where,
                drafter_config.feature_layers, drafter_config.draft_vocab_size or "full")
    return drafter


def convert(src: str | os.PathLike, out: str | os.PathLike, *, target: str | os.PathLike | None = None,
            trust_pickle: bool = False) -> Path:
    """One-time conversion of a published checkpoint into mmspec's own layout (Drafter.save_pretrained) -> out."""
    from .registry import resolve_dir, target_config

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {str(out)!r} exists and is not an empty directory; choose a new --out")
    src_dir = resolve_dir(src, "drafter")
    if is_mmspec_dir(src_dir):
        raise InputError(f"{str(src)!r} is already in mmspec's layout; nothing to convert")
    config = None if target is None else target_config(target)[1]
    drafter = from_checkpoint(src_dir, config, trust_pickle=trust_pickle)
    if target is not None:
        drafter.config.extra["target"] = str(target)  # lets export-drafter find the LM head it shares
    drafter.save_pretrained(out)
    return out


# ---- reading ---------------------------------------------------------------------------------------------------------


def read_checkpoint(path: Path, trust_pickle: bool) -> tuple[dict, dict[str, Tensor]]:
    """-> (config.json as a dict, every tensor by name with a leading "model." dropped)."""
    if not path.is_dir():
        raise MissingInputError(f"drafter directory {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MissingInputError(f"{str(path)!r} has neither {CONFIG_NAME} (mmspec's layout) nor config.json (a "
                                f"published EAGLE / ViSpec checkpoint): not a drafter directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read {str(cfg_file)!r}: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{str(cfg_file)!r} is not a JSON object")
    tensors: dict[str, Tensor] = {}
    for file in _weight_files(path, trust_pickle):
        part = read_weights(file) if file.suffix == ".safetensors" else _read_pickle(file)
        for key, value in part.items():
            key = key.removeprefix("model.")
            if key in tensors:
                raise InputError(f"{str(path)!r}: tensor {key!r} appears in more than one weight file")
            tensors[key] = value
    return config, tensors


def _weight_files(path: Path, trust_pickle: bool) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
                raise InputError(f"cannot read the weight map {str(index)!r}: {e}") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MissingInputError(f"{str(index)!r} names weight files that are not there: {missing}")
            if index_name.startswith("model.safetensors") or _pickle_allowed(path, files, trust_pickle):
                return files
    safe = sorted(path.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise MissingInputError(f"no weights (*.safetensors, or a pickle with trust_pickle) in {str(path)!r}")
    _pickle_allowed(path, pickles, trust_pickle)
    return pickles


def _pickle_allowed(path: Path, files: list[Path], trust_pickle: bool) -> bool:
    if not trust_pickle:
        raise InputError(
            f"the drafter in {str(path)!r} is saved only as a pickle ({', '.join(f.name for f in files)}); unpickling "
            f"can run code, so mmspec reads it only when asked: trust_pickle=True in mmspec.load, or once with "
            f"`mmspec convert-drafter {path} --out NEW_DIR --trust-pickle` (only for a source you trust)"
        )
    return True


def _read_pickle(file: Path) -> dict[str, Tensor]:
    """Tensors only (weights_only=True refuses arbitrary objects even after the opt-in)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad or truncated pickle; all mean "unreadable"
        raise InputError(f"cannot read {str(file)!r} as a tensor pickle ({type(e).__name__}); it may be truncated") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{str(file)!r} does not hold a flat dict of tensors")
    return state


def detect_layout(path: Path, config: dict, tensors: dict[str, Tensor]) -> str:
    """"eagle3", "eagle2" or "vispec", from the architectures and tensor names; InputError for anything else."""
    archs = [str(a) for a in (config.get("architectures") or [])]
    names = set(tensors)
    if any(k.startswith(("imadpt.", "img_fc.")) for k in names):
        return "vispec"
    if any(a in EAGLE3_ARCHITECTURES for a in archs) or any(k.startswith("midlayer.") for k in names):
        return "eagle3"
    fc = tensors.get("fc.weight")
    if fc is not None and fc.dim() == 2 and fc.shape[1] == 2 * fc.shape[0] and "layers.0.self_attn.q_proj.weight" in names:
        return "eagle2"
    sample = ", ".join(sorted(names)[:4])
    raise InputError(f"{str(path)!r}: unknown drafter layout (architectures {archs}, tensors {sample}, ...); mmspec "
                     f"reads its own layout, EAGLE-3 (SpecForge / SGLang / vLLM) and EAGLE-1/2 checkpoints")


# ---- the two layouts ---------------------------------------------------------------------------------------------------


def _layer_config(where: str, config: dict, target_config) -> dict:
    """The Llama fields both layouts share, checked, as DrafterConfig keyword arguments."""
    h = _int(where, config, "hidden_size")
    heads = _int(where, config, "num_attention_heads")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", "mrope"):
        raise InputError(f"{where}: rope type {kind!r}; mmspec's drafter rotates with plain RoPE (default / mrope)")
    theta = config.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise InputError(f"{where}: {config['num_hidden_layers']} draft layers; mmspec runs one-layer drafters")
    for flag in ("attention_bias", "mlp_bias", "qkv_bias", "norm_before_residual"):
        if config.get(flag):
            raise InputError(f"{where}: {flag}=true is not a variant mmspec's drafter layer computes")
    tc = None if target_config is None else target_config.get_text_config()
    return dict(
        hidden_size=h, intermediate_size=_int(where, config, "intermediate_size"), num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or h // heads), vocab_size=_int(where, config, "vocab_size"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        target_num_layers=0 if tc is None else int(tc.num_hidden_layers),
        target_model_type="" if target_config is None else target_config.model_type, vision_adaptor=False,
    )


def _eagle3(where: str, config: dict, tensors: dict[str, Tensor], target_config) -> tuple[DrafterConfig, dict]:
    fields = _layer_config(where, config, target_config)
    prefix = "midlayer." if any(k.startswith("midlayer.") for k in tensors) else "layers.0."
    eagle = config.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state") is False or config.get("bias"):
        raise InputError(f"{where}: an EAGLE-3 head without aux hidden states or with an fc bias is not supported")
    layers = aux_feature_layers(where, config, target_config)
    state = {ours: _pop(where, tensors, theirs.replace("midlayer.", prefix)) for ours, theirs in EAGLE3_KEYS.items()}
    state["fc.weight"] = _pop(where, tensors, "fc.weight")
    head_norm = bool(config.get("norm_output", True))
    if not head_norm:  # SpecForge keeps the norm module, its logits skip it (and so must ours)
        state.pop("norm.weight")
    fc_norm = bool(config.get("fc_norm", False))
    for j in range(3 if fc_norm else 0):
        state[f"fc_norm.{j}.weight"] = _pop(where, tensors, f"fc_norm.{j}.weight")
    embed = tensors.pop("embed_tokens.weight", None)
    if embed is not None:
        state["draft_embed.weight"] = embed
    head = tensors.pop("lm_head.weight", None)
    if head is None and config.get("tie_word_embeddings") and embed is not None:
        head = embed  # SGLang: a tied EAGLE-3 head is its embedding
    d2t, t2d = tensors.pop("d2t", None), tensors.pop("t2d", None)
    vocab = fields["vocab_size"]
    draft_vocab = None
    if head is not None:
        draft_vocab = int(head.shape[0])
        ids = torch.arange(vocab) if d2t is None else ids_from_map(d2t, t2d, vocab, where)
        if ids.numel() != draft_vocab:
            raise InputError(f"{where}: lm_head predicts {draft_vocab} tokens but the token map holds {ids.numel()} "
                             f"(draft_vocab_size {config.get('draft_vocab_size')}, vocab_size {vocab})")
        state["draft_head.weight"], state["d2t"] = head, ids - torch.arange(draft_vocab)
    elif d2t is not None or config.get("draft_vocab_size") not in (None, vocab):
        raise InputError(f"{where}: a reduced draft vocabulary needs its lm_head tensor, and there is none")
    _no_leftovers(where, tensors)
    th = int(config.get("target_hidden_size") or fields["hidden_size"])
    dc = _drafter_config(where, fields, fusion="multi_layer", feature_layers=layers, draft_vocab_size=draft_vocab,
                         own_embedding=embed is not None, target_hidden_size=th if th != fields["hidden_size"] else None,
                         head_norm=head_norm, fc_norm=fc_norm)
    _check_fits(where, dc, target_config)
    return dc, state


def _eagle2(where: str, config: dict, tensors: dict[str, Tensor], target_config) -> tuple[DrafterConfig, dict]:
    if target_config is None:
        raise InputError(f"{where}: an EAGLE-1/2 drafter reads the target's last hidden state; name the target "
                         f"(--target) so mmspec knows which layer that is")
    fields = _layer_config(where, config, target_config)
    if any(k.startswith("layers.") and not k.startswith("layers.0.") for k in tensors):
        raise InputError(f"{where}: more than one draft layer (layers.1.*); mmspec runs one-layer drafters")
    if "layers.0.input_layernorm.weight" in tensors:
        raise InputError(f"{where}: layers.0 has an input norm; EAGLE-1/2's first layer has none, so this is "
                         f"another layout")
    state = {ours: tensors.pop(k) for k, ours in _EAGLE2_KEYS.items() if k in tensors}
    renamed = {"post_attention_layernorm.weight": "post_norm.weight"}
    for key in _EAGLE2_LAYER:
        ours = renamed.get(key, key.split(".", 1)[1])
        state[ours] = _pop(where, tensors, "layers.0." + key)
    embed = tensors.pop("embed_tokens.weight", None)
    if embed is not None:
        state["draft_embed.weight"] = embed
    _no_leftovers(where, tensors)
    n = target_config.get_text_config().num_hidden_layers
    dc = _drafter_config(where, fields, fusion="last", feature_layers=(n,), layer="eagle2", head_norm=False,
                         fc_bias="embed_fc.bias" in state, own_embedding=embed is not None)
    _check_fits(where, dc, target_config)
    return dc, state


def aux_feature_layers(where: str, config: dict, target_config) -> tuple[int, ...]:
    """The EAGLE-3 aux layers as transformers hidden_states indices, ascending (see the module docstring)."""
    top = config.get("eagle_aux_hidden_state_layer_ids")
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    vllm = None if not top else [int(i) for i in top]
    sglang = None if not nested else [int(i) + 1 for i in nested]
    if vllm and sglang and sorted(vllm) != sorted(sglang):
        raise InputError(f"{where}: the aux layer ids disagree: top-level {list(top)} (vLLM: inputs of those layers) "
                         f"vs eagle_config {list(nested)} (SGLang: outputs of those layers)")
    layers = vllm or sglang
    n = None if target_config is None else target_config.get_text_config().num_hidden_layers
    if layers is None:
        if n is None:
            raise InputError(f"{where}: the checkpoint names no aux layers, and the engines' default depends on the "
                             f"target's depth; name the target (--target)")
        layers, source = [2, n // 2, n - 3], "the engines' default (2, L // 2, L - 3)"
    else:
        source = f"top-level ids {list(top)}" if vllm else f"eagle_config ids {list(nested)}"
    if len(layers) != 3 or len(set(layers)) != 3:
        raise InputError(f"{where}: {source} give hidden states {layers}; EAGLE-3 fuses three distinct layers")
    top_ok = n - 1 if n is not None else None
    if min(layers) < 0 or (top_ok is not None and max(layers) > top_ok):
        raise InputError(f"{where}: {source} read hidden states {sorted(layers)}, outside the 0..{top_ok} a "
                         f"{n}-layer target's engines capture")
    return tuple(sorted(layers))


def _drafter_config(where: str, fields: dict, **kw) -> DrafterConfig:
    try:
        return DrafterConfig(**fields, **kw)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _check_fits(where: str, dc: DrafterConfig, target_config) -> None:
    """The checkpoint against the target: hidden size, vocabulary, layers; each mismatch named."""
    if target_config is None:
        return
    problems = Drafter.config_mismatches(dc, target_config)
    if problems:
        raise InputError(f"{where} does not fit the target: " + "; ".join(problems))


def _check_heads(where: str, c: DrafterConfig, state: dict[str, Tensor]) -> None:
    """q / k / v rows against the config's head count x head_dim (torch's own message names no head count)."""
    for proj, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads), ("v", c.num_key_value_heads)):
        w = state.get(f"{proj}_proj.weight")
        if w is not None and w.shape[0] != heads * c.head_dim:
            raise InputError(f"{where}: {proj}_proj has {w.shape[0]} output rows, but config.json says {heads} heads x "
                             f"head_dim {c.head_dim} = {heads * c.head_dim}")


def _pop(where: str, tensors: dict[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise InputError(f"{where}: tensor {key!r} is missing (the checkpoint is incomplete or another layout)")
    return tensors.pop(key)


def _no_leftovers(where: str, tensors: dict[str, Tensor]) -> None:
    left = sorted(k for k in tensors if not k.endswith(_IGNORED))
    if left:
        raise InputError(f"{where}: tensors mmspec would not use: {left[:6]}{' ...' if len(left) > 6 else ''}; "
                         f"refusing rather than load part of the drafter")


def _int(where: str, config: dict, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: config.json needs a positive integer {key!r}, got {value!r}")
    return value
