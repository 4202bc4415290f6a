"""Teacher signals for drafter training: a conversation -> the Example the drafter learns from (the frozen target's
tokens, positions, feature layers and logits), and the host-memory cache that reuses them across epochs. An image
target's Examples come from mmspec.train_image; both feed mmspec.train_objective."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import InputError
from .images import cast_pixels
from .target import target_forward


def encode_conversation(adapter, processor, conv) -> tuple[dict, Tensor]:
    """-> (the target's inputs for the whole conversation, [n] bool mask of assistant tokens).

    The mask comes from rendering growing prefixes with the target's own chat template: the tokens between "history +
    generation prompt" and "history + answer" are the answer. That works for any template, with no template markers."""
    from .images import load_images

    images = load_images(list(conv.images))
    msgs = list(conv.messages)

    def render(messages, gen_prompt):
        text = processor.apply_chat_template(adapter.chat(messages, len(images)), add_generation_prompt=gen_prompt,
                                             tokenize=False)
        if adapter.multimodal:
            return processor(text=text, images=images or None, return_tensors="pt")
        return processor(text, return_tensors="pt", add_special_tokens=False)

    full = render(msgs, False)
    ids = full["input_ids"][0]
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = render(msgs[:k], True)["input_ids"].shape[1]
        end = render(msgs[: k + 1], False)["input_ids"].shape[1]
        if not torch.equal(render(msgs[: k + 1], False)["input_ids"][0], ids[:end]):
            raise InputError(f"line {conv.line_no}: the chat template does not render this conversation prefix-stably")
        mask[start:end] = True
    return dict(full), mask


@dataclass
class Example:
    tokens: Tensor  # [n]
    positions: Tensor  # [n] 1-D target positions
    features: list[Tensor]  # the drafter's feature layers, each [n, H], detached
    input_embeds: Tensor | None  # [n, H]
    teacher_logits: Tensor  # [n, V] the target's logits (row i predicts token i + 1)
    assistant: Tensor  # [n] bool
    n_images: int = 0


@torch.no_grad()
def teach(model, adapter, processor, conv, feature_layers: tuple[int, ...], want_embeds: bool, max_length: int) -> Example:
    inputs, mask = encode_conversation(adapter, processor, conv)
    dev = model.get_output_embeddings().weight.device
    inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    cast_pixels(inputs, model.dtype)
    n = inputs["input_ids"].shape[1]
    if n > max_length:
        raise InputError(f"line {conv.line_no}: {n} tokens, more than --max-length {max_length}")
    out = target_forward(model, inputs, want_hidden=True, want_embeds=want_embeds, all_logits=True, use_cache=False)
    positions, _ = adapter.prompt_positions(model, inputs)
    return Example(
        tokens=inputs["input_ids"][0],
        positions=positions,
        features=[out.hidden_states[i][0] for i in feature_layers],
        input_embeds=None if out.input_embeds is None else out.input_embeds[0],
        teacher_logits=out.logits,
        assistant=mask.to(dev),
        n_images=adapter.count_images(inputs),
    )


_TENSOR_FIELDS = ("tokens", "positions", "input_embeds", "teacher_logits", "assistant")  # and the features list


def example_to(ex: Example, device) -> Example:
    moved = {n: getattr(ex, n).to(device) for n in _TENSOR_FIELDS if getattr(ex, n) is not None}
    return replace(ex, features=[f.to(device) for f in ex.features], **moved)


def example_bytes(ex: Example) -> int:
    tensors = [getattr(ex, n) for n in _TENSOR_FIELDS] + list(ex.features)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TeacherCache:
    """`teach` for the training set (a list of Examples per conversation: one, or one per row of an image drafter),
    remembered per conversation (by its line in the data file) on the host until
    `budget_bytes` are used up; later conversations are recomputed every time.

    The target is frozen and `teach` is deterministic, so a cached Example is exactly what recomputing would give:
    training is unchanged, only faster (on the mini models the teacher is ~40 % of a step, and the build's drafters
    see each conversation ~5 times)."""

    def __init__(self, compute, budget_bytes: int, device) -> None:
        self.compute, self.budget, self.device = compute, budget_bytes, device
        self.used, self.hits = 0, 0
        self._store: dict[int, Example] = {}

    def __call__(self, conv) -> list[Example]:
        if conv.line_no in self._store:
            self.hits += 1
            return [example_to(ex, self.device) for ex in self._store[conv.line_no]]
        exs = self.compute(conv)
        size = sum(example_bytes(ex) for ex in exs)
        if self.used + size <= self.budget:
            self._store[conv.line_no] = [example_to(ex, "cpu") for ex in exs]
            self.used += size
        return exs
