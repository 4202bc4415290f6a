"""Tiny random-weight checkpoints of real transformers model classes, built fully offline.

`build_tiny(family, out_dir)` writes a directory that loads exactly like a user's checkpoint:
`AutoProcessor.from_pretrained(dir)` plus `AutoModelForImageTextToText.from_pretrained(dir)` (VLM families) or
`AutoTokenizer` / `AutoModelForCausalLM` (`text_llm`). Nothing touches the Hugging Face hub.

Families and the transformers classes they use:

- ``llava``       LlavaForConditionalGeneration (CLIP vision + Llama), LlavaProcessor, LlavaImageProcessor
- ``llava_next``  LlavaNextForConditionalGeneration (anyres, small grid pinpoints), LlavaNextProcessor
- ``qwen2_vl``    Qwen2VLForConditionalGeneration (M-RoPE), Qwen2VLProcessor, Qwen2Tokenizer
- ``qwen2_5_vl``  Qwen2_5_VLForConditionalGeneration (windowed vision attention), Qwen2_5_VLProcessor
- ``generic_vlm`` Mistral3ForConditionalGeneration (Pixtral vision + plain Mistral decoder), PixtralProcessor.
                  Chosen because its language model is an ordinary decoder (4-D masks, 1-D position ids work), and
                  its image spans are not contiguous runs of one token: each patch row of ``[IMG]`` tokens ends
                  with ``[IMG_BREAK]`` and the image with ``[IMG_END]``, which exercises span handling.
- ``text_llm``    LlamaForCausalLM with a chat-template tokenizer.
- ``janus``       JanusForConditionalGeneration (image generation: 16 VQ codes per image), JanusProcessor

The tokenizer is a byte-level BPE trained at build time with the ``tokenizers`` library on a fixed English word
list (deterministic, any text encodes, 512 ids), wrapped in ``Qwen2Tokenizer`` for the Qwen families and in the
generic ``TokenizersBackend`` (alias ``PreTrainedTokenizerFast``) elsewhere. The chat template accepts string content
or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts and ``add_generation_prompt``.

Weights: ``torch.manual_seed(seed)`` before construction, and a larger ``initializer_range`` in the language model
so a random model's logits have clear top-1 margins (greedy output varies instead of repeating one token, and
float reordering between a tree forward and an incremental forward does not flip the argmax).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "generic_vlm", "text_llm")
IMAGE_FAMILIES = ("janus",)  # AR image generators (ImagePipeline), kept apart: the VLM tests run over FAMILIES

VOCAB_SIZE = 512
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 2048
# std of the language model's random init; 0.02 (the usual) gives near-uniform logits on a 64-wide model
LM_INIT_STD = 0.25

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# text that stands in for one image in the chat template, per family
IMAGE_PLACEHOLDER = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "generic_vlm": "[IMG]",
    "text_llm": "",
    "janus": "<image_placeholder>",
}
FAMILY_SPECIAL_TOKENS = {
    "llava": ("<image>",),
    "llava_next": ("<image>",),
    "qwen2_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    "generic_vlm": ("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    "text_llm": (),
    "janus": ("<image_placeholder>", "<begin_of_image>", "<end_of_image>"),
}
# Janus's processor reads these tokenizer attributes (transformers' extra_special_tokens)
JANUS_EXTRA = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}

_WORDS = """
the a an of to in on at by for with from and or but not no yes is are was were be been being has have had do does
did this that these those there here it its they them their we you he she his her i me my your our what which who
where when why how all any some many much more most few one two three four five six seven eight nine ten first last
next left right top bottom middle center above below near far inside outside between behind front back up down over
under small large big tiny huge tall short long wide narrow round square flat bright dark light heavy red green blue
yellow orange purple pink brown black white gray grey color colour shape shapes circle circles square squares
triangle triangles rectangle star stars line lines dot dots picture image photo scene shows show showing contains
contain there's object objects background foreground corner edge side sky sun tree trees house car cat dog bird man
woman person people water grass road table chair box ball cup book window door wall floor answer question describe
description caption count number how many see look looks like appears seems very quite also only just then so than
as can could would should will may might must please thank thanks hello sure okay good bad new old same different
another other each every both either neither about after before again always never often sometimes because while
""".split()


def _corpus() -> list[str]:
    """Deterministic training text: the word list in a few orders plus digits and punctuation."""
    rng = np.random.default_rng(1234)
    lines = [" ".join(_WORDS), "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024", ". , ? ! : ; ' \" ( ) - + = / * % $ # @"]
    for _ in range(40):
        order = rng.permutation(len(_WORDS))
        words = [_WORDS[i] for i in order[:30]]
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def _chat_template(image_text: str) -> str:
    image = image_text.replace("'", "\\'")
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ eos_token + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )


def _train_bpe(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(family: str):
    """A fast tokenizer for `family` with bos/eos/pad, the family's image tokens and the chat template."""
    from transformers import AddedToken, PreTrainedTokenizerFast, Qwen2Tokenizer

    extra = list(ROLE_TOKENS) + list(FAMILY_SPECIAL_TOKENS[family])
    special = [PAD, BOS, EOS] + extra
    bpe = _train_bpe(special)
    template = _chat_template(IMAGE_PLACEHOLDER[family])
    common = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=template)
    if family.startswith("qwen"):
        vocab = bpe.get_vocab()
        merges = [tuple(m) for m in _bpe_merges(bpe)]
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, **common)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in extra]}
        )
    else:
        if family == "janus":
            common["extra_special_tokens"] = JANUS_EXTRA
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **common)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in extra]}
        )
    return tokenizer


def _bpe_merges(tok: Tokenizer) -> list[list[str]]:
    import json

    return [m if isinstance(m, list) else m.split(" ") for m in json.loads(tok.to_str())["model"]["merges"]]


def sample_images(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` small deterministic RGB images of varied sizes: a colour gradient with a random rectangle."""
    rng = np.random.default_rng(seed)
    sizes = [(48, 32), (32, 48), (40, 40), (64, 40), (36, 56)]  # (width, height)
    images = []
    for i in range(n):
        w, h = sizes[(i + seed) % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, size=3)
        arr = np.stack([(base[c] + xx * (c + 1) * 3 + yy * (3 - c) * 2) % 256 for c in range(3)], axis=-1)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, size=3)
        images.append(Image.fromarray(arr.astype(np.uint8), mode="RGB"))
    return images


def _text_kwargs(tokenizer, **overrides) -> dict:
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=LM_INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return kw


def _build_llava(tokenizer, next_: bool):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    image_size, patch = 32, 8  # 16 patches per tile
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=HEADS,
        image_size=image_size, patch_size=patch, projection_dim=HIDDEN,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common_ip = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if next_:
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=image_token_id, image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **common_ip)
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    else:
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=image_token_id,
            image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
            vision_feature_select_strategy="default", tie_word_embeddings=False,
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = LlavaImageProcessor(**common_ip)
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    return model, processor


def _build_qwen(tokenizer, v25: bool):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in FAMILY_SPECIAL_TOKENS["qwen2_vl"]}
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
    text = _text_kwargs(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]})
    top = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if v25:
        vision = dict(
            depth=2, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_heads=HEADS, out_hidden_size=HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
        model_cls, proc_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        vision = dict(
            depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, num_heads=HEADS,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **top)
        model_cls, proc_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    model = model_cls(config)
    # 28 px per merged token: small images give 9..25 image tokens
    pixels = dict(min_pixels=84 * 84, max_pixels=140 * 140, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = proc_cls(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _build_mistral3(tokenizer):
    from transformers import (
        MistralConfig,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    patch, merge = 8, 2  # 16 px per image token
    vision = PixtralVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=HEADS,
        head_dim=HIDDEN // HEADS, image_size=64, patch_size=patch,
    )
    text = MistralConfig(**_text_kwargs(tokenizer, head_dim=HIDDEN // HEADS, sliding_window=None))
    config = Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=merge, vision_feature_layer=-1, tie_word_embeddings=False,
    )
    model = Mistral3ForConditionalGeneration(config)
    image_processor = PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": patch, "width": patch})
    processor = PixtralProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, spatial_merge_size=merge,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _build_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_text_kwargs(tokenizer))), tokenizer


def _build_janus(tokenizer):
    """Janus in both modes, tiny: 16 px images in 4 px patches, so an image is 4 x 4 = 16 VQ codes of a 64-entry
    codebook (downsample 4: two VQ levels); the understanding tower is as small as the config allows."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    image_px, patch = 16, 4
    n_codes = (image_px // patch) ** 2
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_px,
                               patch_size=patch, projection_dim=HIDDEN, num_image_tokens=n_codes)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2],
                          num_res_blocks=1, latent_channels=32, projection_dim=HIDDEN, image_token_embed_dim=HIDDEN)
    text = LlamaConfig(**_text_kwargs(tokenizer))
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    model = JanusForConditionalGeneration(config)
    with torch.no_grad():  # a random generation head at the usual init is near-uniform; widen it like the LM's
        model.model.generation_head.vision_head.weight.normal_(0.0, LM_INIT_STD)
    image_processor = JanusImageProcessor(size={"height": image_px, "width": image_px})
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=n_codes,
                               chat_template=tokenizer.chat_template)
    model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")}
    return model, processor


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random-weight model of `family` with its processor and save both into `out_dir`."""
    if family not in FAMILIES + IMAGE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES + IMAGE_FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        model, processor = _build_llava(tokenizer, next_=family == "llava_next")
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        model, processor = _build_qwen(tokenizer, v25=family == "qwen2_5_vl")
    elif family == "generic_vlm":
        model, processor = _build_mistral3(tokenizer)
    elif family == "janus":
        model, processor = _build_janus(tokenizer)
    else:
        model, processor = _build_llama(tokenizer)
    model.set_attn_implementation("sdpa")
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def micro_mini_vlm(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """The mini-vlm build path at micro size: `n` shapes-world conversations, their tokenizer and an untrained micro
    target. Returns (data jsonl, model dir)."""
    from mmspec.data_tools import train_target as tt
    from mmspec.data_tools.shapes_world import TASKS, make_dataset
    from mmspec.data_tools.tokenizer import conversation_texts, train_tokenizer

    data = make_dataset(n, root / "data", seed=seed, tasks=TASKS)
    train_tokenizer(conversation_texts(data), root / "tok")
    return data, tt.build_target(root / "tok", root / "init", size="micro", seed=0)
