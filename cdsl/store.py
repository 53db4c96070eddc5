"""KV caches of many sequences on one model, and one batched forward over any mix of them.

A `SeqStore` keeps each sequence's cache under a string key, so the model can live in another
process (a Ray worker) and only token ids and logits cross the boundary. A `Run` is one
sequence's share of a forward: crop its cache, maybe fork or adopt another cache first, feed
some tokens. `SeqStore.run` executes a list of runs as ONE forward: caches of different lengths
are left-padded into one batch, new tokens right-padded, an attention mask hides the padding and
position ids keep each row's own positions, so every row computes what it would have alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cdsl.models import LM


class CacheLost(RuntimeError):
    """A call continues a cache this store does not hold (its worker restarted): the request
    must start again from its emitted tokens."""


KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each [rows, heads, length, head_dim]."""


@dataclass
class Run:
    """One sequence's share of a batched forward."""

    key: str
    """Cache to extend (created empty on first use)."""
    tokens: list[list[int]]
    """Tokens to feed: one list per cache row, all the same length."""
    keep: int
    """Crop the cache to this many tokens before feeding (after `moves` and `fork`)."""
    moves: list[tuple[str, str, int]] = field(default_factory=list)
    """(dst, src, row), applied first: dst becomes row `row` of src's cache, src is dropped."""
    fork: str | None = None
    """Start `key` as this cache repeated once per row of `tokens` (a rollout)."""
    last_only: bool = False
    """Return only the last position's logits."""


def _crop(kv: KV | None, length: int) -> KV | None:
    if kv is None or length == 0:
        return None
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


def _length(kv: KV | None) -> int:
    return 0 if kv is None else kv[0][0].shape[2]


def _merge(caches: list[KV | None], rows: list[int], past: int) -> KV:
    """One batch cache: each entry's rows copied once, right-aligned at `past` (zeros in front)."""
    like = next(kv for kv in caches if kv is not None)
    out = []
    for layer in range(len(like)):
        k0 = like[layer][0]
        keys = k0.new_zeros((sum(rows), k0.shape[1], past, k0.shape[3]))
        values = torch.zeros_like(keys)
        start = 0
        for kv, n in zip(caches, rows):
            if kv is not None:
                k, v = kv[layer]
                keys[start:start + n, :, past - k.shape[2]:] = k  # broadcasts a fork's expanded row
                values[start:start + n, :, past - k.shape[2]:] = v
            start += n
        out.append((keys, values))
    return out


def _bytes(kv: KV | None) -> int:
    """Bytes a cache's own slices hold (not the batch tensors they may view)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv or ())


def _copied(kv: KV | None) -> KV | None:
    return None if kv is None else [(k.clone(), v.clone()) for k, v in kv]


def _width_class(width: int) -> int:
    """Runs are batched with others of similar width: padding a one-token rollout row to a
    prompt's length would cost more than a separate forward."""
    return 0 if width == 1 else width.bit_length()


class SeqStore:
    """Caches by key on one LM; `run` answers a batch of `Run`s with one forward."""

    def __init__(self, lm: LM) -> None:
        self.lm = lm
        self.caches: dict[str, KV | None] = {}
        self.keeps_logits = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        """Whether the model can skip the logits of positions nobody reads."""
        self._viewing: dict[str, tuple[int, int]] = {}
        """Key -> (the batched forward whose output tensors its cache is a view of, its bytes)."""
        self._batches: dict[int, list] = {}
        """Batched forward -> [bytes of its output caches, bytes its viewers hold, the viewers]."""
        self._forwards = 0

    def _set(self, key: str, kv: KV | None, batch: int | None = None) -> None:
        """Store `key`'s cache (a view into batched forward `batch`'s output, if given)."""
        self._unlink(key)
        self.caches[key] = kv
        if batch is not None and kv is not None and batch in self._batches:
            size = _bytes(kv)
            self._viewing[key] = (batch, size)
            self._batches[batch][1] += size
            self._batches[batch][2].add(key)

    def _drop(self, key: str) -> KV | None:
        self._unlink(key)
        return self.caches.pop(key)

    def _unlink(self, key: str) -> None:
        """`key` stops viewing its batch's tensors. Once the keys left view less than half of
        them, they get copies of their own, so the batch's memory is freed: a few long-lived
        views cannot pin many large batches (each batch is copied at most once, and at most half)."""
        batch, size = self._viewing.pop(key, (None, 0))
        if batch is None:
            return
        entry = self._batches[batch]
        entry[1] -= size
        entry[2].discard(key)
        if 2 * entry[1] < entry[0]:
            for k in entry[2]:
                self.caches[k] = _copied(self.caches[k])
                del self._viewing[k]
            del self._batches[batch]

    def _prepare(self, run: Run) -> KV | None:
        for dst, src, row in run.moves:
            if src not in self.caches:
                raise CacheLost(f"cache {src!r} is gone")
            kv = self.caches[src]
            self._set(dst, None if kv is None else [(k[row:row + 1], v[row:row + 1]) for k, v in kv],
                      self._viewing.get(src, (None, 0))[0])
            self._drop(src)
        if run.fork is not None:
            if run.fork not in self.caches:
                raise CacheLost(f"cache {run.fork!r} is gone")
            base = _crop(self.caches.get(run.fork), run.keep)
            n = len(run.tokens)
            return None if base is None else [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in base]
        kv = self.caches.get(run.key)
        if run.keep > _length(kv):
            raise CacheLost(f"cache {run.key!r} holds {_length(kv)} tokens, asked to keep {run.keep}")
        return _crop(kv, run.keep)

    def run(self, runs: list[Run]) -> list[torch.Tensor | CacheLost | MemoryError]:
        """Execute `runs` as one forward; logits per run, [rows, T, V] ([rows, V] if last_only).
        A run whose cache is gone gets a `CacheLost` in its place, one that cannot fit in memory a
        `MemoryError`, and the others still run."""
        results: list = [None] * len(runs)
        groups: dict[int, list[tuple[int, Run, KV | None]]] = {}
        for i, r in enumerate(runs):
            try:
                kv = self._prepare(r)
            except CacheLost as err:
                results[i] = err
                continue
            groups.setdefault(_width_class(len(r.tokens[0])), []).append((i, r, kv))
        for group in groups.values():
            self._answer(group, results)
        return results

    def _answer(self, group: list[tuple[int, Run, KV | None]], results: list) -> None:
        """One forward for `group`. Out of memory, it halves the group until the run that does not
        fit even alone, which gets a `MemoryError`; every other run is still answered."""
        try:
            outs = self._forward([r for _, r, _ in group], [kv for _, _, kv in group])
        except torch.OutOfMemoryError as err:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(group) == 1:
                (i, r, _), = group
                results[i] = MemoryError(f"out of memory running {len(r.tokens)} x {len(r.tokens[0])} tokens on "
                                         f"{self.lm.device}: {err}")
                return
            half = len(group) // 2
            self._answer(group[:half], results)
            self._answer(group[half:], results)
            return
        for (i, _, _), out in zip(group, outs):
            results[i] = out

    @torch.inference_mode()
    def _forward(self, runs: list[Run], caches: list[KV | None]) -> list[torch.Tensor]:
        rows = [len(r.tokens) for r in runs]
        lens = [_length(kv) for kv in caches]
        widths = [len(r.tokens[0]) for r in runs]
        past, width = max(lens), max(widths)
        ids = torch.zeros(sum(rows), width, dtype=torch.long)
        mask = torch.zeros(sum(rows), past + width, dtype=torch.long)
        pos = torch.zeros(sum(rows), width, dtype=torch.long)
        start = 0
        for r, n, p, w in zip(runs, rows, lens, widths):
            ids[start:start + n, :w] = torch.tensor(r.tokens)
            mask[start:start + n, past - p:past + w] = 1
            pos[start:start + n] = torch.arange(p, p + width)
            start += n
        if past == 0:
            cache = DynamicCache()
        elif len(runs) == 1 and rows[0] == 1:
            cache = DynamicCache(ddp_cache_data=caches[0])
        else:
            cache = DynamicCache(ddp_cache_data=_merge(caches, rows, past))
        dev = self.lm.device
        extra = {}
        if bool((mask == 0).any()):  # padding to hide; without it the model's own causal path is faster
            extra = {"attention_mask": mask.to(dev), "position_ids": pos.to(dev)}
        last = all(r.last_only for r in runs) and min(widths) == width and self.keeps_logits
        if last:  # only the last position's logits are wanted: skip the [rows, T, V] projection
            extra["logits_to_keep"] = 1
        out = self.lm.model(input_ids=ids.to(dev), cache=cache, use_cache=True, **extra)
        logits = out.logits[..., : self.lm.vocab_size].float().cpu()
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        batch = None
        if len(runs) > 1:  # several keys will view these tensors: track them (see `_unlink`)
            batch = self._forwards = self._forwards + 1
            self._batches[batch] = [sum(k.nbytes + v.nbytes for k, v in layers), 0, set()]
        results, start = [], 0
        for r, n, p, w in zip(runs, rows, lens, widths):
            block = slice(start, start + n)
            self._set(r.key, [(k[block, :, past - p:past + w], v[block, :, past - p:past + w]) for k, v in layers],
                      batch)
            results.append(logits[block, -1] if last else logits[block, w - 1] if r.last_only else logits[block, :w])
            start += n
        return results

    def execute(self, calls: list[Run], released: list[str]) -> list[torch.Tensor]:
        """Free `released` keys, then answer `calls` as one batch (the engine's executor interface)."""
        for key in released:
            self.release(key)
        return self.run(calls) if calls else []

    def compact(self, key: str) -> None:
        """Copy `key`'s cache out of the batch it was computed in now (one kept for long, such
        as a reward model's prompt cache), rather than when its batch is mostly freed."""
        if key in self.caches:
            self._set(key, _copied(self.caches[key]))

    def release(self, key: str) -> None:
        """Drop `key` and every cache forked from it (keys starting with `key` + ":")."""
        for name in [k for k in self.caches if k == key or k.startswith(key + ":")]:
            self._drop(name)

    def held_bytes(self) -> int:
        """Bytes of every tensor the caches keep alive (a batch's whole output while any key
        views it), the figure `_unlink` keeps within twice what the caches themselves hold."""
        seen: dict[int, int] = {}
        for kv in self.caches.values():
            for k, v in kv or ():
                for t in (k, v):
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def __len__(self) -> int:
        return len(self.caches)
