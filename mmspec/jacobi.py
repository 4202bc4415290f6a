"""Training-free drafting for image generators: Speculative Jacobi Decoding (SJD, Teng et al., ICLR 2025).

No drafter: each step drafts a window of the next L codes as a chain, and the target verifies it in the same forward
(both CFG rows) that commits the accepted prefix. The window's drafts are samples of the target's own distributions
from the previous verify: the verify at node i predicts the code after it, computed on a prefix that held stale drafts,
so after a step that accepted n codes its rows n.. become the drafts' proposal distributions q for the next window (the
Jacobi iteration), and positions new to the window start from a guess (`init`). Each draft carries the q it was drawn
from, and verify.accept_sampling tests it with min(1, p~(x) / q(x)): lossless under `Exact`.

Coupled draws (MC-SJD, arXiv 2510.24211): a draft is argmax(log q + g) with Gumbel noise g fixed per position until the
position is tested, so a draft only changes where q moved enough; that keeps successive drafts, and so the prefix the
next verify sees, stable. Reusing g is exact: a position's noise is only ever read by its own drafts, and a tested
position is committed (accepted or resampled) before its noise could be read again.

At temperature 0 the drafts are the argmaxes (point drafts) and greedy verification makes the result token-identical
to autoregressive decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SamplingConfig
from .errors import InputError
from .tree import DraftTree
from .verify import Acceptance, warp

INITS = ("left", "uniform")


@dataclass(frozen=True)
class JacobiConfig:
    """window: codes drafted per step; init: how a position new to the window is first drafted ("left": from its left
    neighbour's distribution, "uniform": uniformly over the codebook); coupled: MC-SJD's fixed noise per position."""

    window: int = 16
    init: str = "left"
    coupled: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise InputError(f"JacobiConfig.window must be an integer >= 1 (codes drafted per step), got {self.window!r}")
        if self.init not in INITS:
            raise InputError(f"JacobiConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.coupled, bool):
            raise InputError(f"JacobiConfig.coupled must be True or False, got {self.coupled!r}")


class JacobiProposer:
    """The generation loop's proposer (see mmspec.proposer) for Jacobi windows. `commit` reads the verify's processed,
    combined logits ([T, V], the rows the acceptance rule saw); no target features are needed."""

    needs_features = False
    forwards = 0  # no drafter

    def __init__(self, config: JacobiConfig, sampling: SamplingConfig, generator: torch.Generator | None,
                 n_codes: int, vocab: int) -> None:
        self.config = config
        self.sampling = sampling
        self.generator = generator
        self.n_codes = n_codes
        self.vocab = vocab
        self._probs: Tensor | None = None  # [m, V] proposal distributions of the next m positions after the root
        self._left: Tensor | None = None  # [1, V] the last row of the previous verify (init="left" guesses)
        self._noise: Tensor | None = None  # [m', V] Gumbel noise of the next m' positions (coupled draws)
        self._last = 0  # position of the last code

    def start(self, prompts, first_token: int, first_pos: int) -> None:
        self._probs = self._left = self._noise = None
        self._last = first_pos + self.n_codes - 1

    def propose(self, root: Tensor, root_pos: int) -> DraftTree:
        width = min(self.config.window, self._last - root_pos)
        if width <= 0:  # the root is the last code
            return DraftTree.root_only(root)
        probs = self._window(width, root.device)
        if self.sampling.greedy:
            return DraftTree.chain(torch.cat([root.reshape(1), probs.argmax(-1)]))
        drafts = (probs.log() + self._gumbel(width, root.device)).argmax(-1)
        q = torch.cat([probs.new_zeros(1, self.vocab), probs])  # row 0: the root, not drafted
        return DraftTree.chain(torch.cat([root.reshape(1), drafts]), draft_probs=q)

    def commit(self, tree: DraftTree, acceptance: Acceptance, hidden_states, scores: Tensor) -> None:
        """scores [T, V]: the verify's rows. Row i predicts the code after node i; the new root is the bonus after the
        last accepted node n - 1, so rows n.. predict the next window's positions, and the last row stands for its
        right neighbours under init="left"."""
        n = acceptance.path.numel()
        rows = scores.float()
        probs = rows.softmax(-1) if self.sampling.greedy else warp(rows, self.sampling)
        self._probs, self._left = probs[n:], probs[-1:]
        if self._noise is not None:  # rows 0 .. n - 1 of the noise were tested: never read again
            self._noise = self._noise[n:] if self.config.coupled else None

    def _window(self, width: int, device) -> Tensor:
        """[width, V] proposal distributions: those carried over, then guesses for positions new to the window."""
        have = self._probs if self._probs is not None else torch.empty(0, self.vocab, device=device)
        if have.shape[0] >= width:
            return have[:width]
        if self.config.init == "left" and self._left is not None:
            guess = self._left
        else:
            guess = torch.full((1, self.vocab), 1.0 / self.vocab, device=device)
        return torch.cat([have, guess.expand(width - have.shape[0], -1)])

    def _gumbel(self, width: int, device) -> Tensor:
        """[width, V] Gumbel noise: the carried rows (coupled draws), then fresh ones for new positions."""
        have = self._noise if self._noise is not None else torch.empty(0, self.vocab, device=device)
        if have.shape[0] < width:
            u = torch.rand(width - have.shape[0], self.vocab, generator=self.generator, device=device)
            have = torch.cat([have, -torch.log(-torch.log(u.clamp(min=1e-20)))])
        self._noise = have
        return have[:width]
