"""The "retire" generation path: length-sorted batches whose finished rows leave at once, the
prompt prefix the batch shares computed once, a KV cache that grows in place.

Why each piece (bench/results/cpu/bootstrap.md has the numbers):
- finished rows retired: `generate` keeps computing a row after its end-of-sequence until the
  slowest row of the batch ends; where a step costs about rows × weights (a CPU), that waste is
  the largest cost of Stage 1, whose questions end far before the 200-token cap;
- shared prefixes (Stage 1: every request but its "Question #i"; the judge's instruction;
  the persona of every expert request; the default system turn of every baseline one) are
  prefilled once per batch and repeated across its rows; a batch mixes groups of requests, so
  that baseline and expert answers fill one batch (a step of 32 rows costs ≈ 1.4× one of 16);
- the cache: upstream's DynamicLayer concatenates every step (copies the whole cache, a quarter
  of a 32-row decode step here); ours writes into a buffer that doubles when full.

The scores are upstream's own (`_get_logits_processor` of the same generation config, then
softmax), so temperatures, top-k / top-p and the stop rule are those of `generate`; a sampled id
is drawn from the same distribution by inverse CDF (`sample`: multinomial was a fifth of a
32-row decode step here), greedy ones by argmax.
Not for a patched PRISM model: the gate decides a route per row at the prompt's end, and rows
here are prefilled in two pieces and reordered (the route check uses "sorted").
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class _GrowLayer(DynamicLayer):
    """A DynamicLayer whose keys / values are views of a buffer written in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.n, self._k, self._v = key_states.device, 0, None, None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.n + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            self._grow(key_states, value_states, max(end, 2 * (self.n or 32)))
        self._k[:, :, self.n:end] = key_states
        self._v[:, :, self.n:end] = value_states
        self.n = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, cap: int) -> None:
        new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        if self.n:
            new_k[:, :, :self.n], new_v[:, :, :self.n] = self._k[:, :, :self.n], self._v[:, :, :self.n]
        self._k, self._v = new_k, new_v

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            self._k = self._k[:, :, :self.n].repeat_interleave(repeats, dim=0)
            self._v = self._v[:, :, :self.n].repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._k, self._v

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length():
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]


def _cache_kw(model) -> str:
    """The forward's name for the cache: `cache` (transformers 5.25), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache(model) -> DynamicCache:
    """The model's own cache layout with every plain DynamicLayer replaced by a _GrowLayer
    (sliding-window layers keep upstream's class)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowLayer() if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


def _shared_prefix(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (the last
    prompt token must run with the row's own mask to give its first logits)."""
    n = min(map(len, rows)) - 1
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _heads(prompts: list[list[int]], head: int = 32) -> list[tuple]:
    """Each prompt's group key: its first `head` tokens where another prompt starts alike
    (baseline / expert / judge requests each start alike), else () (a group of lone ones)."""
    from collections import Counter

    heads = [tuple(p[:head]) for p in prompts]
    count = Counter(heads)
    return [h if count[h] > 1 else () for h in heads]


def _batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices per batch: the prompts group by group (_heads), by length within a group
    (little padding), cut into near-equal consecutive batches of ≤ batch_size. A batch may
    hold several groups: _prefill computes each group's prefix once."""
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(_heads(prompts)):
        groups.setdefault(h, []).append(i)
    order = [i for idx in groups.values() for i in sorted(idx, key=lambda i: len(prompts[i]))]
    n = -(-len(order) // batch_size)                     # batches
    cuts = [-(-len(order) * k // n) for k in range(n + 1)]   # sizes differ by ≤ 1
    return [order[cuts[k]:cuts[k + 1]] for k in range(n)]


def _prefix_cache(model, rows: list[list[int]], dev) -> tuple[DynamicCache, list[int]]:
    """A cache of Pmax columns holding each row's group prefix right-aligned (columns before
    it are zeros, masked out), and each row's prefix length. Each group's prefix (_heads; lone
    rows are a group each) runs once, at batch 1."""
    cache, kw, keys = _cache(model), _cache_kw(model), _heads(rows)
    if not _grows(cache):
        return cache, [0] * len(rows)                  # sliding-window layers: whole prompts
    members: dict[tuple, list[int]] = {}
    for i, h in enumerate(keys):
        members.setdefault(h if h else (i,), []).append(i)
    plen = [0] * len(rows)
    parts = []                                             # (rows, prefix length, its cache)
    for idx in members.values():
        p = _shared_prefix([rows[i] for i in idx])
        for i in idx:
            plen[i] = p
        if p:
            c = _cache(model)
            model(input_ids=torch.tensor([rows[idx[0]][:p]], device=dev), **{kw: c},
                  use_cache=True, logits_to_keep=1)
            parts.append((idx, p, c))
    width = max(plen)
    if not width:
        return cache, plen
    for li, layer in enumerate(cache.layers):
        k, v = (t.new_zeros(len(rows), t.shape[1], width, t.shape[3])
                for t in (parts[0][2].layers[li].keys, parts[0][2].layers[li].values))
        for idx, p, c in parts:
            sel = torch.tensor(idx, device=dev)
            k[sel, :, width - p:], v[sel, :, width - p:] = c.layers[li].keys, c.layers[li].values
        _set(layer, k, v, width)
    return cache, plen


@torch.no_grad()
def _prefill(model, rows: list[list[int]], pad: int, dev):
    """Cache after every prompt, logits of each row's last prompt token, the batch state.

    Layout per row: its group's prefix right-aligned in columns 0…Pmax-1, then its own suffix
    left-padded to the longest suffix; the pad columns are masked out and positions count real
    tokens only, so the row attends to exactly its prompt, as in a left-padded `generate`
    batch."""
    cache, plen = _prefix_cache(model, rows, dev)
    suffix = [len(r) - p for r, p in zip(rows, plen)]
    p_max, width = max(plen), max(suffix)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    head = torch.full((len(rows), p_max), pad, dtype=torch.long)  # what the processors read
    mask = torch.zeros(len(rows), p_max + width, dtype=torch.long)
    pos = torch.full((len(rows), width), 1, dtype=torch.long)   # pads: any position (masked)
    for i, (r, p, s) in enumerate(zip(rows, plen, suffix)):
        ids[i, width - s:] = torch.tensor(r[p:])
        if p:
            head[i, p_max - p:] = torch.tensor(r[:p])
        mask[i, p_max - p:p_max] = 1
        mask[i, p_max + width - s:] = 1
        pos[i, width - s:] = torch.arange(p, len(r))
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    logits = _run_suffixes(model, cache, ids, mask, pos, suffix)
    return cache, logits, torch.cat([head.to(dev), ids], dim=1), mask, pos[:, -1:]


def _chunks(lengths: list[int], waste: float = 0.05) -> list[list[int]]:
    """Row indices in runs of similar length (ascending) whose padding stays ≤ `waste` of
    each run's tokens: a prefill computes every pad column of its batch."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        run = [*out[-1], i] if out else [i]
        tokens = len(run) * lengths[i]                     # row i is the run's longest
        if out and tokens - sum(lengths[j] for j in run) <= waste * tokens:
            out[-1] = run
        else:
            out.append([i])
    return out


def _grows(cache: DynamicCache) -> bool:
    """Whether every layer is a _GrowLayer, whose buffers the prefill can lay out itself."""
    return all(isinstance(x, _GrowLayer) for x in cache.layers)


def _set(layer: _GrowLayer, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
    """A _GrowLayer holding n columns of the buffers k, v [B, heads, ≥ n, head_dim]."""
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    layer._k, layer._v, layer.n = k, v, n
    layer.keys, layer.values = k[:, :, :n], v[:, :, :n]


def _run_suffixes(model, cache: DynamicCache, ids, mask, pos, suffix: list[int]) -> torch.Tensor:
    """Prefill every row's suffix into `cache` (its prefix columns already there); the logits
    of each row's last token. Rows of very different suffix lengths (judge prompts) run in
    runs of similar length (_chunks), each padded to its own longest, their keys / values
    written into the batch's layout; otherwise (or with sliding-window layers) one forward."""
    kw, (b, width) = _cache_kw(model), ids.shape
    p_max, runs = mask.shape[1] - width, _chunks(suffix)
    if len(runs) == 1 or not _grows(cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **{kw: cache},
                     use_cache=True, logits_to_keep=1).logits[:, -1].float()
    prefix = [(x._k, x._v) for x in cache.layers] if p_max else None
    logits, bufs = None, None
    for run in runs:
        w, sel = max(suffix[i] for i in run), torch.tensor(run, device=ids.device)
        sub = _cache(model)
        for x, (k, v) in zip(sub.layers, prefix or []):
            _set(x, k[sel, :, :p_max], v[sel, :, :p_max], p_max)
        cols = torch.cat([torch.arange(p_max), torch.arange(p_max + width - w, p_max + width)])
        out = model(input_ids=ids[sel, width - w:], attention_mask=mask[sel][:, cols.to(sel)],
                    position_ids=pos[sel, width - w:], **{kw: sub}, use_cache=True,
                    logits_to_keep=1).logits[:, -1].float()
        if bufs is None:                                   # shapes known from the first run
            logits = out.new_empty(b, out.shape[-1])
            bufs = [tuple(t.new_zeros(b, t.shape[1], p_max + width, t.shape[3])
                          for t in (x._k, x._v)) for x in sub.layers]
            for (k, v), (pk, pv) in zip(bufs, prefix or []):
                k[:, :, :p_max], v[:, :, :p_max] = pk[:, :, :p_max], pv[:, :, :p_max]
        logits[sel] = out
        for (k, v), x in zip(bufs, sub.layers):          # suffix right-aligned, as in one batch
            k[sel, :, p_max + width - w:] = x._k[:, :, p_max:p_max + w]
            v[sel, :, p_max + width - w:] = x._v[:, :, p_max:p_max + w]
    for x, (k, v) in zip(cache.layers, bufs):
        _set(x, k, v, p_max + width)
    return logits


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One id per row of probs [B, V], drawn exactly from that row's distribution by inverse
    CDF in float64 (one uniform per row): the distribution of `generate`'s torch.multinomial,
    not its random stream, at a fifth of its time for 32 rows of 49k ids on this CPU. Ids of
    probability 0 are never drawn (right=True: the first id whose cumulative sum exceeds u)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


@torch.no_grad()
def generate_retiring(model, prompts: list[list[int]], cfg, eos_ids: set[int], pad: int,
                      batch_size: int, bar) -> list[list[int]]:
    """Generated ids per prompt (through the first end-of-sequence id), in the caller's order."""
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    procs = model._get_logits_processor(generation_config=cfg, logits_processor=LogitsProcessorList(),
                                        device=dev)
    eos, kw = torch.tensor(sorted(eos_ids), device=dev), _cache_kw(model)
    out: list[list[int] | None] = [None] * len(prompts)
    for idx in _batches(prompts, batch_size):
        cache, logits, seq, mask, pos = _prefill(model, [prompts[i] for i in idx], pad, dev)
        alive, gen = torch.tensor(idx), {i: [] for i in idx}
        for step in range(cfg.max_new_tokens):
            scores = procs(seq, logits)
            if cfg.do_sample:
                nxt = sample(torch.softmax(scores, dim=-1))
            else:
                nxt = torch.argmax(scores, dim=-1)
            for i, t in zip(alive.tolist(), nxt.tolist()):
                gen[i].append(t)
            done = torch.isin(nxt, eos) | (step + 1 == cfg.max_new_tokens)
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                bar(sum(len(gen[i]) for i in alive[done.cpu()].tolist()), int(done.sum()))
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                alive, nxt = alive[keep.cpu()], nxt[keep]
                seq, mask, pos = seq[keep], mask[keep], pos[keep]
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(nxt), 1)], dim=1)
            pos = pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                           **{kw: cache}, use_cache=True).logits[:, -1].float()
        for i in idx:
            out[i] = gen[i]
    return out
