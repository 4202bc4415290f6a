"""mini-gen's text tokenizer, processor and Janus configuration.

mini-gen is a stock ``transformers.JanusForConditionalGeneration``, so mmspec drives it exactly as it drives
Janus / Janus-Pro. The prompt format is Janus's: ``<s><|User|>: {prompt}\\n\\n<|Assistant|>:`` from the chat template
(with ``add_generation_prompt=True``), and ``processor(text=..., generation_mode="image")`` appends
``<begin_of_image>``. ``<|User|>`` and ``<|Assistant|>`` are single special tokens, which keeps prompts short.

The understanding tower (vision_model + aligner + lm_head) is tiny and untrained: Janus needs it to exist, mini-gen
only generates images.

``GenerationConfig.from_pretrained`` drops ``generation_kwargs``, and Janus's image ``generate`` reads
``generation_config.generation_kwargs["boi_token_id"]`` to build the unconditional row, so a reloaded checkpoint
needs it set again: ``load_mini_gen`` does that from ``mmspec_gen.json`` (written beside the weights).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor,
                          JanusProcessor, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig, PreTrainedTokenizerFast)

from mmspec.hardware import describe_device, native_bf16, training_device

from .gen_world import IMAGE_PX
from .tokenizer import BOS, EOS, PAD

logger = logging.getLogger(__name__)

IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE, BOI, EOI, USER, ASSISTANT)  # ids 0-7 in this order
VOCAB_SIZE = 512
PATCH = 4  # 32 px / 4 = 8x8 = 64 image tokens; the VQ also downsamples by 4 (channel_multiplier has 3 levels)
NUM_IMAGE_TOKENS = (IMAGE_PX // PATCH) ** 2  # mini-gen's and the micro build's
SIDECAR = "mmspec_gen.json"
COND_DROPOUT = 0.1  # share of training rows without their prompt, for classifier-free guidance
PAUSE_FACTOR = 5.0  # a step that took longer than this many mean steps was paused: it counts as this many
CKPT_SECONDS = 300
CKPT_NAME = "ckpt.pt"  # in the generator's work dir: what a stopped or a continued run resumes from

# Janus's conversation format: a user turn, then the assistant prefix the image follows.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- '<|User|>: ' + text + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|Assistant|>: ' + text + eos_token + '\\n\\n' -}}"
    "{%- else -%}{{- text + '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|Assistant|>:' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class GenSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    codes: int  # VQ codebook
    image_px: int = IMAGE_PX

    @property
    def num_image_tokens(self) -> int:
        return (self.image_px // PATCH) ** 2


# "deep" is issue #23's: 12 blocks on 64-px images, 16 x 16 codes, same VQ architecture (a conv VQ is resolution-free)
SIZES = {"mini": GenSize(256, 4, 4, 688, 512), "deep": GenSize(256, 12, 4, 688, 512, image_px=64),
         "fine": GenSize(256, 4, 4, 688, 512, image_px=64),
         "micro": GenSize(64, 1, 2, 128, 64), "micro-deep": GenSize(64, 3, 2, 128, 64, image_px=64),
         "micro-fine": GenSize(64, 1, 2, 128, 64, image_px=64)}


def train_gen_tokenizer(prompts, out_dir: Path | None = None, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on the prompts (the recipe of data_tools/tokenizer.py, with Janus's special tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS insertion: the template writes <s>
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(prompts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},  # read by JanusProcessor
        chat_template=CHAT_TEMPLATE, model_max_length=256, clean_up_tokenization_spaces=False)
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(hf))
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def make_processor(tokenizer, image_px: int = IMAGE_PX) -> JanusProcessor:
    image_processor = JanusImageProcessor(size={"height": image_px, "width": image_px}, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3, min_size=image_px // 2)
    return JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                          num_image_tokens=(image_px // PATCH) ** 2)


def chat_prompt(processor, prompt: str) -> str:
    """The templated text (before <begin_of_image>) for one prompt."""
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids equal to ``processor(text=chat_prompt(p), generation_mode="image")["input_ids"]``, without the
    processor's per-call overhead (a test checks they agree)."""
    text = f"{BOS}{USER}: {prompt}\n\n{ASSISTANT}:{BOI}"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def gen_config(tokenizer, size: str = "mini") -> JanusConfig:
    z = SIZES[size]
    hidden, tokens = z.hidden, z.num_image_tokens
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=z.layers,
                       num_attention_heads=z.heads, num_key_value_heads=z.heads, intermediate_size=z.intermediate,
                       max_position_embeddings=max(256, 2 * tokens), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                       pad_token_id=ids["pad"], tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=z.image_px,
                               patch_size=PATCH, projection_dim=hidden, num_image_tokens=tokens, mlp_ratio=2.0)
    # base_channels 32 is the floor (GroupNorm has 32 groups); three levels downsample by 4 (32 px to an 8x8 grid).
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=z.codes, latent_channels=64, base_channels=32,
                          channel_multiplier=[1, 2, 2], num_res_blocks=2, projection_dim=hidden,
                          image_token_embed_dim=hidden)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), tie_word_embeddings=False)


def generation_config(tokenizer) -> GenerationConfig:
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id,
                            generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)})


def build_gen_model(tokenizer, size: str = "mini", seed: int = 0) -> JanusForConditionalGeneration:
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(gen_config(tokenizer, size))
    model.generation_config = generation_config(tokenizer)
    return model


def load_mini_gen(path: str | Path, dtype=torch.float32):
    """(model, processor) from a mini-gen directory, with boi_token_id restored (see the module docstring)."""
    model = JanusForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    processor = JanusProcessor.from_pretrained(str(path))
    extra = json.loads((Path(path) / SIDECAR).read_text())
    model.generation_config.generation_kwargs = {"boi_token_id": extra["boi_token_id"]}
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------------ build stages
def run_vq_stage(plan, data: Path, tok_dir: Path, out_dir: Path) -> dict:
    """Train the VQ of a fresh mini-gen on data/train.jsonl's images; out_dir/vq.pt holds its state dict."""
    from transformers import AutoTokenizer

    from .train_vq import load_images, train_vq

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    vqmodel = build_gen_model(tokenizer, plan.size, plan.seed).model.vqmodel.to(training_device())
    images, masks = load_images(data / "train.jsonl", data / "train_images.pt")
    held_out, _ = load_images(data / "heldout.jsonl", data / "heldout_images.pt")
    return train_vq(vqmodel, images, masks, held_out, out_dir, steps=plan.vq_steps, batch_size=plan.vq_batch,
                    lr=plan.vq_lr, seed=plan.seed, log_every=50 if plan.size == "mini" else 1,
                    minutes=plan.vq_minutes)


def finetune_vq_stage(plan, data: Path, tok_dir: Path, out_dir: Path, base: Path) -> dict:
    """A deep build's VQ: the trained VQ of the mini-gen in ``base`` (same architecture; convolutions do not depend
    on the image size), its encoder and decoder fine-tuned on this build's images with the codebook frozen, so every
    code keeps the meaning the base generator learned. Unchanged, it left blotches at the borders of 64-px
    reconstructions that the judge counted as objects (docs/mini-gen.md)."""
    from transformers import AutoTokenizer

    from .train_vq import evaluate_vq, load_images, train_vq

    vqmodel = build_gen_model(AutoTokenizer.from_pretrained(str(tok_dir)), plan.size, plan.seed).model.vqmodel
    source, _ = load_mini_gen(base)
    vqmodel.load_state_dict({k: v.float() for k, v in source.model.vqmodel.state_dict().items()})
    vqmodel.to(training_device())
    images, masks = load_images(data / "train.jsonl", data / "train_images.pt")
    held_out, _ = load_images(data / "heldout.jsonl", data / "heldout_images.pt")
    before = evaluate_vq(vqmodel.eval(), held_out)
    metrics = train_vq(vqmodel, images, masks, held_out, out_dir, steps=plan.vq_steps, batch_size=plan.vq_batch,
                       lr=plan.vq_lr, seed=plan.seed, minutes=plan.vq_minutes, resume=True, freeze_codebook=True)
    metrics.update({"from": str(base), "before_finetune": before})
    (out_dir / "vq_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def judge_vq_stage(plan, data: Path, tok_dir: Path, vq_dir: Path) -> dict:
    """Add the judge's verdicts on held-out VQ reconstructions to vq_dir/vq_metrics.json (the generator's ceiling),
    once; a build reads them before it spends an hour on the generator."""
    from transformers import AutoTokenizer

    from .train_vq import judge_reconstructions, load_images

    path = vq_dir / "vq_metrics.json"
    metrics = json.loads(path.read_text())
    if "judge" in metrics or plan.vq_judge_images <= 0:
        return metrics
    vqmodel = build_gen_model(AutoTokenizer.from_pretrained(str(tok_dir)), plan.size, plan.seed).model.vqmodel
    vqmodel.load_state_dict(torch.load(vq_dir / "vq.pt", map_location="cpu"))
    held_out, _ = load_images(data / "heldout.jsonl", data / "heldout_images.pt")
    scenes = [r["scene"] for r in load_prompt_records(data / "heldout.jsonl", plan.vq_judge_images)]
    metrics["judge"] = judge_reconstructions(vqmodel.eval(), held_out, scenes, plan.vq_judge_images)
    logger.info("judge on held-out VQ reconstructions: %s", metrics["judge"])
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def load_prompt_records(jsonl: Path, limit: int | None = None) -> list[dict]:
    with open(jsonl, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:limit]
    return [json.loads(line) for line in lines]


def _encode_all(vqmodel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 images [N, 3, px, px] -> codes [N, (px / 4)^2] long (the frozen VQ's, computed once)."""
    from tqdm import tqdm

    from .train_vq import encode_codes, to_pixels

    chunks = [encode_codes(vqmodel, to_pixels(images[i:i + batch]))
              for i in tqdm(range(0, len(images), batch), desc="encoding images", unit="batch", disable=None)]
    return torch.cat(chunks)


def guided_batch(model, ids: list[list[int]], codes: torch.Tensor, pad: int, keep: set[int], drop: torch.Tensor):
    """Logits [B, 64, V] for prompts ``ids`` (left-padded here) followed by their codes [B, 64].

    Rows where ``drop`` is true are the unconditional ones, built as Janus's generate builds them: every prompt
    token other than BOS and BOI becomes the pad token, same length, still attended (~10 % condition dropout)."""
    length = max(len(x) for x in ids)
    tok = torch.full((len(ids), length), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for r, x in enumerate(ids):
        tok[r, length - len(x):], mask[r, length - len(x):] = torch.tensor(x), 1
    is_kept = torch.zeros_like(tok, dtype=torch.bool)
    for k in keep:
        is_kept |= tok == k
    tok = torch.where(drop[:, None] & ~is_kept & (mask == 1), torch.full_like(tok, pad), tok)
    tok, mask, codes = tok.to(model.device), mask.to(model.device), codes.to(model.device)
    embeds = torch.cat([model.get_input_embeddings()(tok),
                        model.prepare_embeddings_for_image_generation(codes[:, :-1])], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(len(ids), codes.shape[1] - 1)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)  # left padding: the first real token sits at position 0
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                        position_ids=positions).last_hidden_state
    return model.model.generation_head(hidden[:, length - 1:])  # from BOI on: each position predicts the next code


@torch.no_grad()
def _step_seconds(since: float, state: dict) -> float:
    """The seconds one step adds to the schedule's clock: its wall time, but at most PAUSE_FACTOR times the mean step
    so far, so a build paused (kill -STOP, a suspended laptop) resumes where its schedule stood."""
    took = time.perf_counter() - since
    mean = state["elapsed"] / state["step"] if state["step"] > 20 else took
    return min(took, PAUSE_FACTOR * mean)


def _heldout_loss(model, ids, codes, pad, keep, batch: int = 64) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(ids), batch):
        logits = guided_batch(model, ids[i:i + batch], codes[i:i + batch], pad, keep,
                        torch.zeros(len(ids[i:i + batch]), dtype=torch.bool))
        total += F.cross_entropy(logits.float().flatten(0, 1), codes[i:i + batch].flatten().to(logits.device),
                                 reduction="sum").item()
    model.train()
    return total / codes.numel()


def _prepare_generator(plan, data: Path, tok_dir: Path, vq_dir: Path, out_dir: Path, device: torch.device):
    """The model (trained VQ loaded, generation embeddings = its normalised codebook, or up-scaled from
    ``plan.init_from``) on ``device``, and the encoded data (on the CPU)."""
    from transformers import AutoTokenizer

    from .train_vq import load_images

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model = build_gen_model(tokenizer, plan.size, plan.seed)
    model.model.vqmodel.load_state_dict(torch.load(vq_dir / "vq.pt", map_location="cpu"))
    model.model.vqmodel.eval()
    with torch.no_grad():
        codebook = model.model.vqmodel.quantize.embedding.weight
        model.model.generation_embeddings.weight.copy_(F.normalize(codebook, dim=-1))
    if plan.init_from:
        upscale(model, load_mini_gen(plan.init_from)[0].float())
    model.to(device)
    cache = out_dir / "codes.pt"
    train = load_prompt_records(data / "train.jsonl", plan.gen_n_train)
    held = load_prompt_records(data / "heldout.jsonl")
    if cache.exists():
        codes = torch.load(cache)
    else:
        images, _ = load_images(data / "train.jsonl", data / "train_images.pt")
        held_images, _ = load_images(data / "heldout.jsonl", data / "heldout_images.pt")
        codes = {"train": _encode_all(model.model.vqmodel, images[:len(train)]),
                 "heldout": _encode_all(model.model.vqmodel, held_images)}
        torch.save(codes, cache)
    ids = {"train": [prompt_ids(tokenizer, r["prompt"]) for r in train],
           "heldout": [prompt_ids(tokenizer, r["prompt"]) for r in held]}
    return tokenizer, model, ids, codes


@torch.no_grad()
def upscale(model, source) -> list[int | None]:
    """Depth up-scaling (LLaMA-Pro, Wu et al. 2024): ``model``'s language model gets ``source``'s text embeddings,
    final norm and generation embeddings / aligner / head; its blocks, in groups of len(model) / len(source), start
    as one of source's blocks followed by copies of that block whose output projections (attention o_proj, MLP
    down_proj) are zero, so each added block starts as the identity and the up-scaled model as the source. Returns,
    per block, the source block it copies (None for an added block)."""
    dst, src = model.model.language_model, source.model.language_model
    group, rest = divmod(len(dst.layers), len(src.layers))
    if rest or group < 1:
        raise ValueError(f"cannot up-scale {len(src.layers)} blocks to {len(dst.layers)}: need a multiple")
    dst.embed_tokens.load_state_dict(src.embed_tokens.state_dict())
    dst.norm.load_state_dict(src.norm.state_dict())
    for name in ("generation_embeddings", "generation_aligner", "generation_head"):
        getattr(model.model, name).load_state_dict(getattr(source.model, name).state_dict())
    origin: list[int | None] = []
    for i, block in enumerate(dst.layers):
        block.load_state_dict(src.layers[i // group].state_dict())
        origin.append(i // group if i % group == 0 else None)
        if i % group:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return origin


def _trainable(model) -> list[torch.nn.Parameter]:
    """The generation path: language model, generation embeddings / aligner / head. VQ and understanding tower
    stay as they are (frozen VQ; untrained tower)."""
    for p in model.parameters():
        p.requires_grad_(False)
    parts = (model.model.language_model, model.model.generation_embeddings, model.model.generation_aligner,
             model.model.generation_head)
    params = [p for m in parts for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _resume(ckpt: Path, model, opt, g: torch.Generator) -> dict:
    """The loop's state, restored with model, optimizer and generator from ``ckpt`` when it exists."""
    if not ckpt.exists():
        return {"step": 0, "elapsed": 0.0, "exported_early": False, "log": []}
    blob = torch.load(ckpt, weights_only=False, map_location="cpu")
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["opt"])
    g.set_state(blob["rng"])
    logger.info("resumed the generator at step %d (%.1f min)", blob["state"]["step"], blob["state"]["elapsed"] / 60)
    return blob["state"]


def _save_ckpt(ckpt: Path, model, opt, g: torch.Generator, state: dict) -> None:
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(), "state": state}, tmp)
    tmp.replace(ckpt)


def _gen_step(plan, model, opt, params, batch: dict, g: torch.Generator, lr: float, bf16: bool) -> float:
    # the draws stay on the CPU generator ``g``, so a run draws the same batches on any device
    """One optimizer step on a random batch of (prompt ids, re-quantised codes); returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    idx = torch.randint(len(batch["ids"]), (plan.gen_batch,), generator=g)
    drop = torch.rand(plan.gen_batch, generator=g) < COND_DROPOUT
    target = swap_codes(batch["codes"][idx], batch["neighbours"], plan.code_swap_p, g)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = guided_batch(model, [batch["ids"][i] for i in idx], target, batch["pad"], batch["keep"], drop)
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten().to(logits.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def _gen_lr(plan, step: int, progress: float) -> float:
    """200 warmup steps, then a cosine that follows the clock (``progress``), so any budget ends annealed."""
    return plan.gen_lr * min(1.0, (step + 1) / 200) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_generator(plan, data: Path, tok_dir: Path, vq_dir: Path, out_dir: Path, export_fn=None) -> dict:
    """Train the generator for ``plan.gen_minutes`` (or ``plan.gen_max_steps``); resumable from
    out_dir/ckpt.pt. ``export_fn(model, info)`` is called once after ``plan.export_after_minutes`` and at the end;
    out_dir/final.pt holds the final state dict and out_dir/done.json the training record. Its minutes are training
    minutes: a pause (see _step_seconds) does not spend them."""
    from .train_vq import pick_threads

    out_dir.mkdir(parents=True, exist_ok=True)
    device = training_device()
    threads, bf16 = pick_threads(0), native_bf16(device)  # bf16 autocast (fp32 weights) where it is native
    tokenizer, model, ids, codes = _prepare_generator(plan, data, tok_dir, vq_dir, out_dir, device)
    pad, keep = tokenizer.pad_token_id, {tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(BOI)}
    params = _trainable(model)
    batch = {"ids": ids["train"], "codes": codes["train"], "pad": pad, "keep": keep,
             "neighbours": code_neighbours(model.model.vqmodel.quantize.embedding.weight, plan.code_swap_k)}
    opt = torch.optim.AdamW(params, lr=plan.gen_lr, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(plan.seed)
    ckpt = out_dir / CKPT_NAME
    state = _resume(ckpt, model, opt, g)
    budget, held = plan.gen_minutes * 60, (ids["heldout"][:256], codes["heldout"][:256])
    model.train()
    last_step, last_ckpt, losses = time.perf_counter(), time.perf_counter(), []
    while state["step"] < plan.gen_max_steps and state["elapsed"] < budget:
        lr = _gen_lr(plan, state["step"], state["elapsed"] / budget)
        losses.append(_gen_step(plan, model, opt, params, batch, g, lr, bf16))
        state["step"] += 1
        state["elapsed"] += _step_seconds(last_step, state)
        last_step = time.perf_counter()
        if state["step"] % 100 == 0:
            threads = pick_threads(threads)
        if state["step"] % 50 == 0:
            logger.info("gen step %d loss %.4f lr %.2e (%.1f min, %.2f s/step)", state["step"],
                        sum(losses[-50:]) / len(losses[-50:]), lr, state["elapsed"] / 60,
                        state["elapsed"] / max(1, state["step"]))
        if time.perf_counter() - last_ckpt > CKPT_SECONDS:
            state["log"].append({"step": state["step"], "minutes": round(state["elapsed"] / 60, 1),
                                 "train_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
                                 "heldout_loss": round(_heldout_loss(model, *held, pad, keep), 4)})
            logger.info("gen checkpoint: %s", state["log"][-1])
            _save_ckpt(ckpt, model, opt, g, state)
            last_ckpt = time.perf_counter()
        if (export_fn is not None and not state["exported_early"] and 0 < plan.export_after_minutes
                and state["elapsed"] > plan.export_after_minutes * 60):
            state["exported_early"] = True
            export_fn(model, {"generator": {**_record(state, losses), "final": False}})
    _save_ckpt(ckpt, model, opt, g, state)
    record = {**_record(state, losses), "heldout_loss": round(_heldout_loss(model, *held, pad, keep), 4),
              "bf16_autocast": bf16, "device": describe_device(device), "final": True, "init_from": plan.init_from,
              "residual_updates": gen_block_updates(model, *held, pad, keep)}
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out_dir / "final.pt")
    (out_dir / "done.json").write_text(json.dumps(record, indent=1) + "\n")
    logger.info("generator done: %s", {k: v for k, v in record.items() if k != "log"})
    if export_fn is not None:
        export_fn(model, {"generator": record})
    return record


def gen_block_updates(model, ids: list[list[int]], codes: torch.Tensor, pad: int, keep: set[int],
                      batch: int = 32) -> list[float]:
    """Each block's mean relative residual update (``target_eval.block_updates``) on held-out prompts and their
    codes (conditional rows, padding excluded): the evidence that every block of a deep generator does work."""
    from .target_eval import block_updates

    def forward(i):
        def run():
            chunk = ids[i:i + batch]
            guided_batch(model, chunk, codes[i:i + batch], pad, keep, torch.zeros(len(chunk), dtype=torch.bool))
            length = max(len(x) for x in chunk)
            mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in chunk])
            return torch.cat([mask, torch.ones(len(chunk), codes.shape[1] - 1, dtype=torch.long)], dim=1)
        return run

    model.eval()
    with torch.no_grad():
        updates = block_updates(model.model.language_model.layers, map(forward, range(0, len(ids), batch)))
    model.train()
    return updates


def code_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """[V, k] each code's k nearest other codes by cosine (the geometry decode uses), nearest first."""
    e = F.normalize(codebook.detach().float(), dim=-1)
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=-1).indices


def swap_codes(codes: torch.Tensor, neighbours: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Stochastic re-quantisation: each code [B, 64] becomes, with probability p, one of its k nearest neighbours.

    The small VQ smooths the rendered pixel noise away, so without this each image has one deterministic code
    sequence and the target grew sure of every code (mean top-1 probability 0.60 with CFG 5 at T = 1 after 2,200
    steps). Neighbour codes decode to visibly the same patch (cosine >= 0.87 for the 8 nearest), so this puts the
    image-level noise back as the code-level ambiguity LANTERN relaxes (Jang et al., ICLR 2025): the target learns
    to spread a patch's mass over near-interchangeable codes."""
    if p <= 0:
        return codes
    swap = torch.rand(codes.shape, generator=g) < p
    pick = neighbours[codes, torch.randint(neighbours.shape[1], codes.shape, generator=g)]
    return torch.where(swap, pick, codes)


def _record(state: dict, losses: list[float]) -> dict:
    recent = losses[-100:] or [float("nan")]
    return {"steps": state["step"], "minutes": round(state["elapsed"] / 60, 1),
            "train_loss": round(sum(recent) / len(recent), 4), "log": state["log"]}
