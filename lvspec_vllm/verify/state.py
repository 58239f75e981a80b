"""Per-request verification state: the sticky codebook and the history of visual relevance.

Lives in the worker with the rejection sampler, keyed by request id. A request's state is created
on its first verify step and dropped as soon as the request leaves the model runner (finished or
aborted); ``retain`` is called every step with the live ids, so nothing outlives its request and
nothing is shared between requests. A preempted request stays in the runner (vLLM resumes it with
the same tokens), so it keeps its codebook: its verification does not depend on scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class RequestState:
    codebook: list[int] = field(default_factory=list)  # token ids that stay strict
    # Welford running statistics of v_j over the request's verified positions
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add_relevance(self, values: Iterable[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0


class RequestStates:
    def __init__(self, codebook_capacity: int = 256, min_history: int = 8):
        self.capacity = codebook_capacity
        self.min_history = min_history
        self._states: dict[str, RequestState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def get(self, req_id: str, initial_codebook: Iterable[int] = ()) -> RequestState:
        state = self._states.get(req_id)
        if state is None:
            state = self._states[req_id] = RequestState(
                codebook=list(dict.fromkeys(initial_codebook))[:self.capacity])
        return state

    def retain(self, live_req_ids: Iterable[str]) -> None:
        """Drop the state of every request that is no longer live."""
        live = set(live_req_ids)
        for req_id in [r for r in self._states if r not in live]:
            del self._states[req_id]

    def add_anchors(self, req_id: str, token_ids: Iterable[int]) -> None:
        state = self._states[req_id]
        known = set(state.codebook)
        for tok in token_ids:
            if tok not in known and len(state.codebook) < self.capacity:
                state.codebook.append(tok)
                known.add(tok)

    def threshold(self, req_id: str, mode: str, absolute: float, sigma: float) -> float:
        """The request's current relevance threshold (absolute, or mean + sigma * std)."""
        state = self._states[req_id]
        if mode == "relative" and state.count >= self.min_history:
            return state.mean + sigma * state.std
        return absolute

    def codebook_tensor(self, req_ids: list[str], device) -> torch.Tensor:
        """[B, C] padded with -1, C = the longest codebook in the batch."""
        books = [self._states[r].codebook for r in req_ids]
        width = max((len(b) for b in books), default=0)
        out = torch.full((len(req_ids), width), -1, dtype=torch.int64)
        for i, book in enumerate(books):
            if book:
                out[i, :len(book)] = torch.tensor(book, dtype=torch.int64)
        return out.to(device, non_blocking=True)
