"""The EAGLE drafter: one decoder layer over (token embedding, target feature), sharing the target's embedding and LM head.

Layout follows EAGLE-3 so one module serves both fusion modes and exports to the layout vLLM / SGLang load:
- fusion="last" (EAGLE-1/2): the feature is the target's last hidden state.
- fusion="multi_layer" (EAGLE-3): low / mid / high layer hidden states, concatenated and projected 3H -> H by `fc`.
The layer's attention reads [norm(embedding) | norm(feature)] (2H wide q/k/v); the residual stream is the feature. Its
output is a predicted next feature: fed back as the feature for the next draft depth, and through `norm` + the target's
LM head it gives the draft logits.

Published checkpoints (mmspec.external_drafters) add config fields: layer="eagle2" (EAGLE-1/2: `embed_fc` projects
[embedding | feature] into a plain layer's residual stream, no norms on its inputs or before the head);
draft_vocab_size (an own LM head over a reduced draft vocabulary, token map `d2t`, mmspec.draft_vocab); an own
embedding, target features of another width, SpecForge's fc_norm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .adapters import adapter_for, generates_images
from .draft_kv import DraftKV  # noqa: F401 - re-exported: the proposer and tests import it from here
from .errors import InputError, MissingInputError
from .vision import VisionAdaptor

logger = logging.getLogger(__name__)

CONFIG_NAME = "mmspec_drafter.json"
WEIGHTS_NAME = "model.safetensors"
FUSIONS = ("last", "multi_layer")
MODALITIES = ("text", "image")
LAYERS = ("eagle3", "eagle2")


@dataclass(frozen=True)
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_num_layers: int
    feature_layers: tuple[int, ...]  # indices into the target's hidden_states tuple (0 = embeddings)
    fusion: str = "multi_layer"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    target_model_type: str = ""
    vision_adaptor: bool = False
    num_queries: int = 2
    image_token_id: int | None = None
    # "text": drafts the target's text tokens through its token embedding and LM head; "image": drafts an AR image
    # generator's VQ codes through its code embedding and generation head (Janus family, mmspec.adapters.janus)
    modality: str = "text"
    # image drafters: 1 reads the cond row and was trained on the guided distribution; 2 reads both CFG rows, was
    # trained on each row's own distribution, and drafts from their logits combined as the target's (LANTERN)
    draft_rows: int = 1
    extra: dict = field(default_factory=dict)
    layer: str = "eagle3"  # "eagle2": EAGLE-1/2's layer (see the module docstring)
    draft_vocab_size: int | None = None  # None: the target's LM head over its whole vocabulary (borrowed, never saved)
    own_embedding: bool = False  # a token embedding of the drafter's own instead of the target's
    target_hidden_size: int | None = None  # width of each target feature, when it differs from hidden_size
    fc_bias: bool = False  # eagle2: embed_fc has a bias
    head_norm: bool = True  # `norm` before the LM head (EAGLE-3); EAGLE-1/2 read the output as it is
    fc_norm: bool = False  # SpecForge's fc_norm: an RMSNorm on each target feature before fc

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise InputError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.modality not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.draft_rows not in (1, 2) or (self.draft_rows == 2 and self.modality != "image"):
            raise InputError(f"draft_rows must be 1, or 2 for an image drafter (both CFG rows), got {self.draft_rows}")
        if self.modality == "image" and self.vision_adaptor:
            raise InputError("an image-code drafter reads no input images: use vision_adaptor=False")
        # target_num_layers 0: not recorded (a converted checkpoint that names its layers); checked at bind
        bad = [i for i in self.feature_layers if i < 0 or (self.target_num_layers and i > self.target_num_layers)]
        if bad:
            raise InputError(f"feature_layers {bad} outside the target's 0..{self.target_num_layers} hidden states")
        self._check_variant()

    def _check_variant(self) -> None:
        """The published-checkpoint variations: only the combinations the layer can compute."""
        if self.layer not in LAYERS:
            raise InputError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if self.layer == "eagle2" and (self.fusion != "last" or self.vision_adaptor or self.modality != "text"):
            raise InputError("an eagle2 layer drafts text from the last hidden state: fusion='last', no vision adaptor")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise InputError(f"draft_vocab_size must be 1..{self.vocab_size}, got {self.draft_vocab_size}")
        wide = self.target_hidden_size not in (None, self.hidden_size)
        if wide and (self.fusion != "multi_layer" or not self.own_embedding or self.draft_vocab_size is None):
            raise InputError("target features of another width need fc (multi_layer), an own embedding and LM head")
        if self.fc_norm and self.fusion != "multi_layer":
            raise InputError("fc_norm normalises the features fc fuses; it needs fusion='multi_layer'")

    def to_json(self) -> str:
        return json.dumps({"format": "mmspec-drafter", "version": 1, **asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DrafterConfig":
        d = {k: v for k, v in d.items() if k not in ("format", "version")}
        d["feature_layers"] = tuple(d["feature_layers"])
        return cls(**d)


def _rope_theta(text_config) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(text_config, "rope_theta", 10000.0))


def default_feature_layers(num_layers: int, fusion: str) -> tuple[int, ...]:
    """EAGLE-3 reads a low, a middle and a high layer (2, L//2, L-3); EAGLE-1/2 the final (normed) hidden state.

    Indices are into transformers' hidden_states, where index L is the post-norm output: multi_layer never takes it
    (engines like vLLM capture pre-norm layer inputs), and avoids 0 (the embeddings, which vLLM cannot capture) where
    it can. Where EAGLE-3's choice would repeat a layer (L = 4..6), three evenly spread distinct layers of 1..L-1; a
    3-layer target has only two of those, so it gets EAGLE-3's own (0, 1, 2): fusing three distinct layers beats
    fusing a layer twice, though the engines cannot serve it (export says so)."""
    if fusion == "last":
        return (num_layers,)
    top = max(num_layers - 1, 1)
    clamp = lambda i: min(max(i, 1), top)  # noqa: E731
    layers = (clamp(2), clamp(num_layers // 2), clamp(num_layers - 3))
    if len(set(layers)) < 3 and num_layers >= 3:
        layers = (1 if num_layers >= 4 else 0, num_layers // 2, num_layers - 1)
    return layers


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, or an InputError naming the file: a truncated download or an interrupted
    copy otherwise surfaces as safetensors' bare "incomplete metadata" with no file name."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise InputError(f"{str(path)!r} is not a complete safetensors file ({e}); it may be truncated or corrupt: "
                         f"copy or save it again") from None
    except OSError as e:
        raise InputError(f"cannot read {str(path)!r}: {e.strerror or e}") from None


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = c = config
        h, hd = c.hidden_size, c.head_dim
        n_feat, th = len(c.feature_layers), c.target_hidden_size or c.hidden_size
        self.fc = nn.Linear(n_feat * th, h, bias=False) if c.fusion == "multi_layer" else None
        eagle3 = c.layer == "eagle3"
        self.input_norm = nn.RMSNorm(h, eps=c.rms_norm_eps) if eagle3 else None
        self.hidden_norm = nn.RMSNorm(h, eps=c.rms_norm_eps) if eagle3 else None
        self.embed_fc = None if eagle3 else nn.Linear(2 * h, h, bias=c.fc_bias)
        qkv_in = 2 * h if eagle3 else h
        self.q_proj = nn.Linear(qkv_in, c.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(qkv_in, c.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(qkv_in, c.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, h, bias=False)
        self.post_norm = nn.RMSNorm(h, eps=c.rms_norm_eps)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        self.norm = nn.RMSNorm(h, eps=c.rms_norm_eps) if c.head_norm else None
        self.fc_norm = nn.ModuleList(nn.RMSNorm(th, eps=c.rms_norm_eps) for _ in range(n_feat)) if c.fc_norm else None
        self.draft_embed = nn.Embedding(c.vocab_size, h) if c.own_embedding else None
        self.draft_head = nn.Linear(h, c.draft_vocab_size, bias=False) if c.draft_vocab_size is not None else None
        # d2t [draft_vocab_size] int64: target id = draft id + d2t[draft id]; None for the full vocabulary
        self.register_buffer("d2t", None if c.draft_vocab_size is None else torch.zeros(c.draft_vocab_size).long())
        self.vision: VisionAdaptor | None = None
        self.inject: nn.Linear | None = None
        if c.vision_adaptor:
            self.vision = VisionAdaptor(h, c.num_attention_heads, c.num_queries, c.rms_norm_eps)
            # ViSpec: [feature | image vector] -> H, initialised to pass the feature through unchanged ([I | 0]), so an
            # untrained adaptor starts from exactly the text-only drafter.
            self.inject = nn.Linear(2 * h, h, bias=False)
            with torch.no_grad():
                self.inject.weight.zero_()
                self.inject.weight[:, :h].copy_(torch.eye(h))
        # Rotary cos / sin per position, computed in fp32 (position * frequency needs more than bf16's 8 bits) and kept
        # outside the module state (a buffer would be cast by .to(dtype)); a table, because recomputing the angles
        # took a sixth of a draft forward. The signed sine folds rotate_half into one roll.
        self._rope: tuple[Tensor, Tensor] | None = None  # cos, signed sin: [capacity, head_dim] in the drafter's dtype
        # The target's embedding and LM head, borrowed (never saved); a tuple keeps them out of this module's state.
        self._shared: tuple[nn.Module, nn.Module] | None = None

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def for_target(
        cls,
        model_or_config,
        vision_adaptor: bool = True,
        num_queries: int = 2,
        fusion: str = "multi_layer",
        feature_layers: tuple[int, ...] | None = None,
        draft_rows: int = 1,
        intermediate_size: int | None = None,
        num_heads: int | None = None,
        draft_vocab: Tensor | None = None,
    ) -> "Drafter":
        """An untrained drafter sized to the target (a transformers model or its config). For an AR image generator
        (Janus family) it drafts image codes: modality "image", no vision adaptor. intermediate_size and num_heads
        (default: the target's) make a leaner layer: a draft forward reads every drafter weight, so on a CPU its
        cost follows their size; the head width stays the target's, so the rotary angles are the same.
        draft_vocab: [N] ascending target ids of a reduced draft vocabulary (mmspec.draft_vocab.most_frequent); the
        drafter then has its own LM head over them, initialised from those rows of the target's."""
        model = model_or_config if isinstance(model_or_config, nn.Module) else None
        config = model.config if model is not None else model_or_config
        image_gen = generates_images(config)
        vision_adaptor = vision_adaptor and not image_gen
        image_token_id = next(
            (int(v) for k in ("image_token_id", "image_token_index") if (v := getattr(config, k, None)) is not None), None
        )
        if vision_adaptor and image_token_id is None and not image_gen:
            raise InputError(
                f"vision_adaptor=True needs a target with an image token; {config.model_type!r} has none "
                f"(use vision_adaptor=False for text-only targets)"
            )
        tc = config.get_text_config()
        n_layers = tc.num_hidden_layers
        heads = tc.num_attention_heads
        for name, value in (("intermediate_size", intermediate_size), ("num_heads", num_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer (default: the target's), got {value!r}")
        config_obj = DrafterConfig(
            hidden_size=tc.hidden_size,
            intermediate_size=intermediate_size or tc.intermediate_size,
            num_attention_heads=num_heads or heads,
            num_key_value_heads=num_heads or getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab_size=int(config.vq_config.num_embeddings) if image_gen else tc.vocab_size,
            target_num_layers=n_layers,
            feature_layers=tuple(feature_layers or default_feature_layers(n_layers, fusion)),
            fusion=fusion,
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(tc),
            target_model_type=config.model_type,
            vision_adaptor=vision_adaptor,
            num_queries=num_queries,
            image_token_id=None if image_gen else image_token_id,
            modality="image" if image_gen else "text",
            draft_rows=draft_rows,
            draft_vocab_size=None if draft_vocab is None else int(draft_vocab.numel()),
        )
        drafter = cls(config_obj)
        if draft_vocab is not None:
            drafter.set_draft_vocab(draft_vocab, None if model is None else model.get_output_embeddings().weight)
        if model is not None:
            drafter.bind(model)
        return drafter

    @torch.no_grad()
    def set_draft_vocab(self, ids: Tensor, target_head: Tensor | None = None) -> None:
        """Install the token map of [N] ascending target ids; with the target's LM head [V, H], start from its rows."""
        from .draft_vocab import offsets

        if self.d2t is None or ids.numel() != self.d2t.numel():
            raise InputError(f"the draft vocabulary holds {self.config.draft_vocab_size} tokens, got {ids.numel()}")
        self.d2t.copy_(offsets(ids.cpu()).to(self.d2t.device))
        if target_head is not None:
            self.draft_head.weight.copy_(target_head[ids.to(target_head.device)].to(self.draft_head.weight))

    @property
    def draft_token_ids(self) -> Tensor | None:
        """[N] the target id of each draft id; None for the whole target vocabulary."""
        return None if self.d2t is None else torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def target_ids(self, draft_ids: Tensor) -> Tensor:
        """Draft-vocabulary ids (any shape) -> the target's ids, what the tree and the target see."""
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    def bind(self, target: nn.Module) -> "Drafter":
        """Share the target's token embedding and LM head, after checking that this drafter was built for it."""
        problems = self.mismatches(target.config)
        if problems:
            raise InputError("drafter does not match the target: " + "; ".join(problems))
        if self.config.modality == "image":
            adapter = adapter_for(target.config)
            self._shared = (adapter.code_embedding(target), adapter.code_head(target))
        else:
            self._shared = (target.get_input_embeddings(), target.get_output_embeddings())
        return self

    def mismatches(self, target_config) -> list[str]:
        return self.config_mismatches(self.config, target_config)

    @staticmethod
    def config_mismatches(c: DrafterConfig, target_config) -> list[str]:
        """What keeps a drafter of config `c` from running on a target of `target_config`, one phrase per problem."""
        tc = target_config.get_text_config()
        out = []
        if (c.target_hidden_size or c.hidden_size) != tc.hidden_size:
            out.append(f"hidden size {c.target_hidden_size or c.hidden_size} vs target {tc.hidden_size}")
        image_gen = generates_images(target_config)
        vocab = int(target_config.vq_config.num_embeddings) if image_gen else tc.vocab_size
        if c.vocab_size != vocab:
            out.append(f"vocabulary {c.vocab_size} vs target {vocab}")
        if (c.modality == "image") != image_gen:
            what = "an image generator's codes" if c.modality == "image" else "text tokens"
            out.append(f"drafts {what}, the target {'generates images' if image_gen else 'generates text'}")
        if max(c.feature_layers, default=0) > tc.num_hidden_layers:
            out.append(f"reads hidden states {list(c.feature_layers)}, the target has 0..{tc.num_hidden_layers}")
        elif c.target_num_layers and c.target_num_layers != tc.num_hidden_layers:
            out.append(f"built for a {c.target_num_layers}-layer target, this one has {tc.num_hidden_layers} layers")
        if c.target_model_type and c.target_model_type != target_config.model_type:
            out.append(f"built for model type {c.target_model_type!r}, target is {target_config.model_type!r}")
        return out

    # ---- persistence --------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(self.config.to_json() + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, target: nn.Module | None = None) -> "Drafter":
        """Load config + safetensors weights; never unpickles. Binds to `target` when given (checking it matches)."""
        path = Path(path)
        if not path.is_dir():
            raise MissingInputError(f"drafter directory {str(path)!r} does not exist")
        cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_file.is_file() and (path / "config.json").is_file():
            raise InputError(f"{str(path)!r} is a published checkpoint, not Drafter.save_pretrained's layout: load it "
                             f"with mmspec.load(target, drafter=DIR), or convert it once with `mmspec convert-drafter`")
        if not weights.is_file():
            pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise InputError(
                    f"drafter in {str(path)!r} is saved only as a pickle ({', '.join(pickles)}); mmspec loads "
                    f"safetensors only, because unpickling can run arbitrary code. If you trust the file, convert it "
                    f"once: mmspec convert-drafter {str(path)} --out NEW_DIR --trust-pickle"
                )
            raise MissingInputError(f"no {WEIGHTS_NAME} in drafter directory {str(path)!r}")
        if not cfg_file.is_file():
            raise MissingInputError(f"no {CONFIG_NAME} in {str(path)!r}: not a directory written by Drafter.save_pretrained")
        try:
            config = DrafterConfig.from_dict(json.loads(cfg_file.read_text()))
        except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and DrafterConfig's InputError are ValueErrors
            raise InputError(f"{cfg_file} is not a valid mmspec drafter config: {e}") from None
        except OSError as e:
            raise InputError(f"cannot read drafter config {str(cfg_file)!r}: {e.strerror or e}") from None
        drafter = cls(config)
        state = read_weights(weights)
        missing, unexpected = drafter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"drafter weights in {str(weights)!r} do not fit its config: missing {missing}, unexpected {unexpected}")
        if target is not None:
            drafter.bind(target)
        return drafter

    # ---- compute ------------------------------------------------------------------------------------------------
    @property
    def embed_tokens(self) -> nn.Module:
        if self.draft_embed is not None:
            return self.draft_embed
        if self._shared is None:
            raise RuntimeError("drafter is not bound to a target; call drafter.bind(target) first")
        return self._shared[0]

    @property
    def lm_head(self) -> nn.Module:
        if self.draft_head is not None:
            return self.draft_head
        if self._shared is None:
            raise RuntimeError("drafter is not bound to a target; call drafter.bind(target) first")
        return self._shared[1]

    def fuse(self, hidden_states: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        """Target hidden states (each [..., H], indexed like transformers' `hidden_states`) -> drafter feature [..., H]."""
        return self.fuse_selected([hidden_states[i] for i in self.config.feature_layers])

    def fuse_selected(self, feats: list[Tensor]) -> Tensor:
        """The feature layers already picked out (in `feature_layers` order), each [..., H] -> [..., H]."""
        if self.fc is None:
            return feats[0].to(self.q_proj.weight.dtype)
        if self.fc_norm is not None:  # SpecForge's fc_norm
            feats = [norm(f.to(self.fc.weight.dtype)) for norm, f in zip(self.fc_norm, feats)]
        return self.fc(torch.cat(feats, dim=-1).to(self.fc.weight.dtype))

    def inputs(
        self, token_ids: Tensor, features: Tensor, embeds: Tensor | None = None, image_vec: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """-> (x [B, n, 2H] attention input, residual [B, n, H]).

        token_ids [B, n]; features [B, n, H] fused features; embeds [B, n, H] optional embeddings that replace the
        token embeddings (the adaptor's image slots); image_vec [B, n or 1, H] the global image vector in force."""
        emb = self.embed_tokens(token_ids).to(features.dtype) if embeds is None else embeds.to(features.dtype)
        if self.inject is not None:
            vec = features.new_zeros(()) if image_vec is None else image_vec.to(features.dtype)
            features = self.inject(torch.cat([features, vec.expand_as(features)], dim=-1))
        if self.embed_fc is not None:  # EAGLE-1/2: the projection of [embedding | feature] is the residual stream
            x = self.embed_fc(torch.cat([emb, features], dim=-1))
            return x, x
        return torch.cat([self.input_norm(emb), self.hidden_norm(features)], dim=-1), features

    def _angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """[...] positions -> cos and signed sin [..., head_dim]. rotate_half(x) * sin == roll(x, hd/2) * [-sin | sin]
        because the two halves of the angle table are equal."""
        c = self.config
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=positions.device).float() / c.head_dim))
        freqs = positions.float()[..., None] * inv  # [..., hd/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)

    def _rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """[..., n] positions -> cos and signed sin [..., n, head_dim]; on a CPU looked up in a table grown by doubling.
        On an asynchronous device the angles are computed in place: sizing the table needs positions.max() on the
        host, a sync on every forward."""
        if positions.device.type != "cpu":
            return self._angles(positions, dtype)
        top = int(positions.max()) + 1
        table = self._rope
        if table is None or table[0].shape[0] < top or table[0].dtype != dtype:
            self._rope = table = self._angles(torch.arange(max(1024, 1 << (top - 1).bit_length())), dtype)
        return table[0][positions], table[1][positions]

    def qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, n, 2H] inputs, [B, n] positions -> rotated q [B, heads, n, hd], k and v [B, kv_heads, n, hd]."""
        c = self.config
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = self._rotary(positions, q.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, n, hd]
        half = c.head_dim // 2
        return q * cos + q.roll(half, dims=-1) * sin, k * cos + k.roll(half, dims=-1) * sin, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """mask [B or 1, n, kv] bool (True = attend), or None for plain causal -> [B, n, heads * hd]."""
        c = self.config
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None], is_causal=mask is None,
            enable_gqa=c.num_key_value_heads != c.num_attention_heads,
        )
        return out.transpose(1, 2).flatten(2)

    def finish(self, residual: Tensor, attn: Tensor) -> Tensor:
        """Output projection and MLP -> [B, n, H] predicted features."""
        h = residual + self.o_proj(attn)
        y = self.post_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def forward(
        self,
        token_ids: Tensor,
        features: Tensor,
        positions: Tensor,
        mask: Tensor | None,
        kv: DraftKV | None,
        embeds: Tensor | None = None,
        image_vec: Tensor | None = None,
    ) -> Tensor:
        """One drafter step over n new pairs (feature f_j, token t_{j+1}).

        token_ids: [B, n];  features: [B, n, H] fused features;  positions: [B, n] target positions of the tokens;
        mask: [B or 1, n, past + n] bool (True = attend), or None for causal without a cache.
        Returns [B, n, H]: the predicted feature at each token's position.
        """
        x, residual = self.inputs(token_ids, features, embeds, image_vec)
        q, k, v = self.qkv(x, positions)
        if kv is not None:
            k, v = kv.append(k, v)
        return self.finish(residual, self.attend(q, k, v, mask))

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., H] predicted features -> [..., V] draft logits (or [..., N] over a draft vocabulary: see target_ids)."""
        head = self.lm_head
        hidden = hidden if self.norm is None else self.norm(hidden)
        return head(hidden.to(next(head.parameters()).dtype))
