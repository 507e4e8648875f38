"""Per-request routes under continuous batching, and the per-token adapter ids of one flattened
batch (see batching.py for where the engine hands them over)."""

from __future__ import annotations

import threading

import torch

from prism_fast import ops

SALT_SHIFT = 24          # token ids below 2**24; route r hashes ids + (r + 1) << 24 (int32-safe, L ≤ 64)


class RouteBook:
    """Routes of one manager's requests: forced, or decided by the gate; None = not yet."""

    def __init__(self, n_adapters: int, default: int | None):
        self.n_adapters, self.default = n_adapters, default   # default 0 without a gate (SPEC)
        self.routes: dict[str, int] = {}
        self.finished: list[str] = []
        self.lock = threading.Lock()
        # Counters for tests and benchmarks: prompt tokens taken from cached blocks, per route
        # the request ran under then (-1 = base); requests restarted under their decided route.
        self.shared: dict[int, int] = {}
        self.restarts = 0

    def check(self, route, name: str = "prism_route") -> int:
        if isinstance(route, bool) or not isinstance(route, int) \
                or not -1 <= route < self.n_adapters:
            raise ValueError(f"{name}: expected an int in -1…{self.n_adapters - 1} (-1 = base, i = "
                             f"persona i), got {route!r}")
        return route

    def set(self, request_id: str, route: int) -> None:
        with self.lock:
            self.routes[request_id] = route

    def get(self, request_id: str) -> int | None:
        with self.lock:
            route = self.routes.get(request_id)
            if route is None and "__child#" in request_id:   # a fork holds its parent's route
                route = self.routes.get(request_id.split("__child#")[0])
        return self.default if route is None else route

    def forget_later(self, request_id: str) -> None:
        """Dropped at the next step, so that forks made in this update still find the route."""
        with self.lock:
            self.finished.append(request_id)

    def flush(self) -> None:
        with self.lock:
            for rid in self.finished:
                self.routes.pop(rid, None)
            self.finished = []


def salted(token_ids: list[int], route: int | None) -> list[int]:
    """Token ids as hashed for prefix sharing: unchanged for base KV, shifted per open route."""
    if route is None or route < 0:
        return token_ids
    shift = (route + 1) << SALT_SHIFT
    return [t + shift for t in token_ids]


class FlatBatch:
    """Per-token routes of one flattened batch, in static buffers (CUDA graphs replay them)."""

    def __init__(self, routing, max_tokens: int, max_requests: int, static: bool):
        dev, i32 = routing.device, torch.int32
        self.routing, self.static, self.max_requests = routing, static, max_requests
        self.known = torch.full((max_tokens,), -1, dtype=i32, device=dev)   # forced / decided
        self.gated = torch.full((max_tokens,), -1, dtype=i32, device=dev)     # with this gate's
        self.slot = torch.zeros(max_tokens, dtype=torch.long, device=dev)   # decision per token
        self.gate_at = torch.zeros(max_requests, dtype=torch.long, device=dev)
        self.decided = torch.full((max_requests,), -1, dtype=i32, device=dev)
        self.n_rows = 0                      # gate rows this forward (0: no gate runs)
        self.tokens = 0
        self.deciding: list = []             # (FutureRequestState, tokens before its chunk)
        self.all_closed = False
        self._views: dict[tuple, torch.Tensor] = {}   # (gated?, shape) → view of a buffer

    def prepare(self, requests, num_tokens: int, book: RouteBook) -> None:
        """Host side, before the forward: known routes per token, and where the gate decides."""
        if num_tokens > self.known.shape[0]:
            raise ValueError(f"batch: {num_tokens} tokens exceed the engine's max_batch_tokens "
                             f"{self.known.shape[0]}")
        gate = self.routing.gate is not None
        known, deciding, at, spans = [-1] * num_tokens, [], [], []
        pos = 0
        for fs in requests:
            state, q = fs.state, fs.query_length
            route = book.get(state.request_id)
            if route is None and gate and fs.has_new_token and state.generated_len() == 0:
                deciding.append((fs, state.position_offset - q))
                at.append(pos + q - 1)        # the chunk's last token is the prompt's last
                spans.append((pos, q))
            elif route is not None and route >= 0:
                known[pos:pos + q] = [route] * q
            pos += q
        self.tokens, self.deciding = num_tokens, deciding
        rows = self.max_requests if (self.static and gate) else len(deciding)
        self.n_rows = rows
        self.all_closed = not deciding and max(known, default=-1) < 0
        self.known[:num_tokens].copy_(torch.tensor(known, dtype=torch.int32), non_blocking=True)
        if rows:
            slot = [rows] * num_tokens          # `rows` points at the closed entry below
            for k, (start, q) in enumerate(spans):
                slot[start:start + q] = [k] * q
            at += [0] * (rows - len(at))
            self.slot[:num_tokens].copy_(torch.tensor(slot), non_blocking=True)
            self.gate_at[:rows].copy_(torch.tensor(at), non_blocking=True)

    def run_gate(self, hidden: torch.Tensor) -> None:
        """After layer 0 (hidden [1, T, H]): decide at each deciding chunk's last token and give
        its tokens the route, on the device (no sync); other tokens keep their known route."""
        rows, t = self.n_rows, hidden.shape[1]
        if not rows:
            return
        h = hidden[0].index_select(0, self.gate_at[:rows])                       # [rows, H]
        routing = self.routing
        decided = ops.gate_routes(h, *routing.gate, triton=routing.triton).to(torch.int32)
        self.decided[:rows].copy_(decided)
        table = torch.cat([decided, decided.new_full((1,), -1)])                  # [rows + 1]
        slot = self.slot[:t]
        self.gated[:t].copy_(torch.where(slot < rows, table[slot], self.known[:t]))

    def ids(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token ids shaped x.shape[:-1] (x [1, T, K], or [T, K] in MoE blocks)."""
        t = x.shape[:-1].numel()
        if t != self.tokens:
            raise ValueError(f"x: expected {self.tokens} tokens of the flattened batch, got "
                             f"{tuple(x.shape)}")
        key = (self.n_rows > 0, x.shape[:-1])
        ids = self._views.get(key)
        if ids is None:   # one view per shape, kept: every layer's op then sees the same tensor
            ids = (self.gated if self.n_rows else self.known)[:t].view(x.shape[:-1])
            self._views[key] = ids
        return ids if ids.device == x.device else ids.to(x.device, non_blocking=True)

    def collect(self, book: RouteBook) -> list:
        """After the forward: record the decided routes; the requests to restart under theirs."""
        if not self.deciding:
            return []
        decided = self.decided[:len(self.deciding)].tolist()
        restart = []
        for (fs, before), route in zip(self.deciding, decided):
            book.set(fs.state.request_id, route)
            if route >= 0 and before > 0:
                restart.append(fs)
        self.deciding = []
        return restart
