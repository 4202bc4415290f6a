"""A toy causal LM for distribution tests through the whole engine, and the chi-square test they share.

Why not a tiny transformers config: a distribution test needs 5e4+ independent generations per setting, and a
transformers forward costs milliseconds of Python even at hidden size 16. `ToyLM` speaks the part of the transformers
forward contract the engine uses (input_ids, a 2-D or 4-D bool attention mask, position_ids, a DynamicCache under the
`cache` keyword, hidden states, logits) in a few tensor ops, so one generation costs well under a millisecond. Its next
token depends on every earlier token through attention over the cache and on absolute positions, so a wrong cache
edit, mask or position changes its distribution. Tiny real checkpoints keep proving token identity elsewhere.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache


class Output(dict):
    """What a transformers forward returns, as far as the engine reads it (keys and attributes); a ModelOutput's
    bookkeeping would cost more than this model's arithmetic."""

    __getattr__ = dict.__getitem__


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 5, dim: int = 8, max_pos: int = 32, seed: int = 0, sharpness: float = 2.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.pos = nn.Parameter(torch.randn(max_pos, dim, generator=g) * 0.5)
        self.qkv = nn.Parameter(torch.randn(dim, 3 * dim, generator=g) / dim**0.5)
        self.head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, dim, generator=g) * sharpness / dim**0.5)
        text = SimpleNamespace(max_position_embeddings=max_pos, vocab_size=vocab)
        self.config = SimpleNamespace(_attn_implementation="sdpa", get_text_config=lambda: text)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok.dtype

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: DynamicCache | None = None, use_cache: bool = True, output_hidden_states: bool = False,
                return_dict: bool = True) -> "Output":
        b, t = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + t).expand(b, t)
        x = self.tok[input_ids] + self.pos[position_ids]
        q, k, v = (x @ self.qkv).chunk(3, dim=-1)
        if use_cache:
            cache = cache if cache is not None else DynamicCache()
            k, v = cache.update(k[:, None], v[:, None], 0)
            k, v = k[:, 0], v[:, 0]
        if attention_mask is None or attention_mask.dim() == 2:  # causal, left padding masked
            keys = k.shape[1]
            mask = torch.ones(t, keys, dtype=torch.bool).tril(keys - t).expand(b, -1, -1)
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, :]
        else:
            mask = attention_mask[:, 0]
        h = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return Output(logits=self.head(h), cache=cache if use_cache else None,
                      hidden_states=(x, h) if output_hidden_states else None)


def sequence_probs(model: ToyLM, rows: list[list[int]], n: int, scores_to_probs) -> dict[tuple[int, ...], float]:
    """The exact distribution of the next `n` tokens: every continuation enumerated, each row run without a cache.
    `scores_to_probs` maps the rows' [B, V] last logits and the continuation so far to the next token's [V] probs."""
    vocab = model.head.weight.shape[0]
    out = {}
    for seq in itertools.product(range(vocab), repeat=n):
        p = 1.0
        for i in range(n):
            logits = torch.stack([model(torch.tensor([r + list(seq[:i])]), use_cache=False).logits[0, -1] for r in rows])
            p *= float(scores_to_probs(logits, seq[:i])[seq[i]])
        out[seq] = p
    return out


def chi_square_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson's goodness-of-fit p-value of `counts` (outcome -> count) against `probs` (outcome -> probability).
    Cells expected below `min_expected` are pooled into one, as the test's chi-square approximation needs."""
    n = sum(counts.values())
    assert set(counts) <= set(probs), f"outcomes the target cannot produce: {sorted(set(counts) - set(probs))[:5]}"
    stat, dof, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for outcome, p in probs.items():
        exp, obs = n * p, counts.get(outcome, 0)
        if exp < min_expected:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
            continue
        stat, dof = stat + (obs - exp) ** 2 / exp, dof + 1
    if pooled_exp > 0:
        stat, dof = stat + (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-12), dof + 1
    if dof <= 0:  # a single possible outcome: the support check above was the whole test
        return 1.0
    half = torch.tensor([dof / 2, stat / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))


class BigramDrafter:
    """A stand-in drafter whose draft logits depend only on the current token: table[token] [V]. Like a real drafter
    it keeps one KV entry per token it reads (so the proposer's crops are exercised); its features are ignored."""

    vision = None
    config = SimpleNamespace(modality="text")

    def __init__(self, table: Tensor):
        self.table = table
        self.q_proj = nn.Linear(1, 1)
        self.calls = 0

    def fuse(self, hidden_states):
        return hidden_states[-1]

    def __call__(self, token_ids, features, positions, mask, kv, embeds=None, image_vec=None):
        self.calls += 1
        b, n = token_ids.shape
        assert mask.shape == (1, n, kv.length + n)
        kv.append(torch.zeros(b, 1, n, 1), torch.zeros(b, 1, n, 1))
        return torch.nn.functional.one_hot(token_ids, self.table.shape[0]).float()

    def logits(self, hidden):
        return self.table[hidden.argmax(-1)]


class TableProposer:
    """A fixed tree shape whose children take the first distinct tokens of a fixed ranking per parent token (the
    target's own ranking after that token alone): a deterministic stand-in for a drafter, right often enough that
    multi-token paths get accepted."""

    needs_features = False
    forwards = 0

    def __init__(self, parents: list[int], ranking: list[list[int]]) -> None:
        self.parents, self.ranking = parents, ranking

    def start(self, prompt, first_token, first_pos):
        pass

    def propose(self, root, root_pos):
        from mmspec import DraftTree

        tokens, taken = [int(root)], {}
        for p in self.parents[1:]:
            rank = taken.get(p, 0)
            taken[p] = rank + 1
            tokens.append(self.ranking[tokens[p]][rank])
        return DraftTree.from_parents(torch.tensor(tokens), self.parents)

    def commit(self, tree, acceptance, hidden_states, scores=None):
        pass


def engine_draws(job) -> tuple[dict, int]:
    """One worker's share of a distribution test: `n` generations of `new` tokens through mmspec's engine, drafted by
    a TableProposer of the tree shape `parents`, by Jacobi windows when `parents` is a JacobiConfig, or by an
    EagleProposer of that TreeConfig over a BigramDrafter whose table is the target's logits after each token alone
    (soft: at temperature > 0 a chain samples its drafts). Returns (continuation -> count, drafted tokens accepted)."""
    from mmspec import Exact, SamplingConfig, TreeConfig
    from mmspec.adapters.base import TextAdapter
    from mmspec.engine import decode, first_row, guidance
    from mmspec.jacobi import JacobiConfig, JacobiProposer
    from mmspec.proposer import EagleProposer
    from mmspec.target import TargetRunner
    from mmspec.verify import acceptor

    parents, sampling, scale, rows, new, n, seed, *rule_and_table = job  # optional: an acceptance rule, neighbours
    rule = rule_and_table[0] if rule_and_table else Exact()
    neighbours = rule_and_table[1] if len(rule_and_table) > 1 else None
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    model = ToyLM(vocab=5)
    vocab = model.head.weight.shape[0]
    width = max(map(len, rows))
    inputs = {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
              "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    after_one = model(torch.arange(vocab)[:, None], use_cache=False).logits[:, -1]  # [V, V]
    ranking = after_one.argsort(-1, descending=True).tolist()
    runner = TargetRunner(model, TextAdapter())
    generator = torch.Generator().manual_seed(seed)
    accept = acceptor(rule, SamplingConfig(**sampling), generator, neighbours)
    combine = first_row if scale is None else guidance(scale)
    counts: dict[tuple[int, ...], int] = {}
    accepted = 0
    with torch.inference_mode():  # as mmspec bench runs it; skips autograd's bookkeeping on every small op
        for _ in range(n):
            tokens = []
            if isinstance(parents, JacobiConfig):
                proposer = JacobiProposer(parents, SamplingConfig(**sampling), generator, new, vocab)
            elif isinstance(parents, TreeConfig):
                proposer = EagleProposer(BigramDrafter(after_one), parents, None if scale is None else combine,
                                         sampling=SamplingConfig(**sampling), generator=generator)
            else:
                proposer = TableProposer(parents, ranking)
            for ev in decode(runner, proposer, inputs, accept, new, frozenset(), combine=combine):
                tokens.extend(ev.token_ids)
                accepted += ev.num_accepted
            counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    return counts, accepted


def pooled_engine_draws(jobs: list) -> tuple[dict, int]:
    """engine_draws over `jobs` split across two processes (this machine has two cores), the counts pooled."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(engine_draws, jobs))
    counts, accepted = {}, 0
    for half, half_accepted in results:
        for seq, c in half.items():
            counts[seq] = counts.get(seq, 0) + c
        accepted += half_accepted
    return counts, accepted
