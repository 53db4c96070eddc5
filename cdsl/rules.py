"""Decoding rules that every method shares, so the lossless relations (sd = greedy, CDSL at its
defaults = CDLH) hold with them in place:

- `NoRepeat`: no word n-gram occurs twice in the output (tokens compared by their lower-cased
  text, punctuation skipped, so "A glass of" repeats "a glass of" and "a ball, a kick, a ball"
  repeats "a ball a"). It is part of each model's next-token
  distribution (the `Decoder` masks every logits row it returns), so greedy, every verification
  and every lookahead see the same distribution. Coverage pays for listing the concepts and
  perplexity cannot see a loop ("a drill, a drill, a drill"); this rule forbids the loop.
- `sentence_ends`: the tokens that close a sentence, for tasks whose answer is one sentence
  (CommonGen): the text ends with the first of them, which is kept.
"""

from __future__ import annotations

import torch

CLOSERS = "\"')]}\u201d\u2019"
"""Characters that may follow a sentence's final mark inside the same token ('."', '!)')."""


class WordKeys:
    """For each token id, the id of the first token with the same lower-cased, stripped text
    (" Glass", "glass" and " glass" share one), or -1 for a token with no letter or digit
    (punctuation, spaces, special tokens), which n-grams skip; and each key's tokens."""

    def __init__(self, tokenizer) -> None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        first: dict[str, int] = {}
        special = set(tokenizer.all_special_ids)
        self.keys: list[int] = []
        self.members: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            word = text.strip().lower()
            key = -1 if i in special or not any(c.isalnum() for c in word) else first.setdefault(word, i)
            self.keys.append(key)
            if key >= 0:
                self.members.setdefault(key, []).append(i)


class NoRepeat:
    """Bans every token that would repeat a word n-gram of the generated text (the prompt does not
    count: a CommonGen prompt lists the concepts the answer must use)."""

    def __init__(self, n: int, start: int, words: WordKeys | None = None) -> None:
        self.n, self.start = n, start
        """n-gram size, and where the generated text starts in a decoder's ids."""
        self.words = words
        """The vocabulary's `WordKeys`; None compares token ids as they are."""

    def banned(self, history: list[int]) -> list[int]:
        """Tokens that may not follow `history` (prompt + output so far)."""
        out, n = history[self.start:], self.n
        if self.words is not None:
            out = [k for k in (self.words.keys[t] for t in out) if k >= 0]
        if n < 1 or len(out) < n - 1:
            return []
        last = out[len(out) - n + 1:] if n > 1 else []
        ban = [out[i + n - 1] for i in range(len(out) - n + 1) if out[i:i + n - 1] == last]
        return ban if self.words is None else [t for key in set(ban) for t in self.words.members[key]]

    def mask(self, logits: torch.Tensor, before: list[list[int]], fed: list[list[int]]) -> torch.Tensor:
        """`logits` [rows, T, V] of a call that fed `fed[i]` after `before[i]` in row i (the last
        T of them: a `last_only` call has T = 1), with banned tokens set to -inf. A copy where
        anything is banned; the same tensor where nothing is."""
        out = logits
        T = logits.shape[1]
        for i, (prior, row) in enumerate(zip(before, fed)):
            for j in range(T):
                history = prior + row[: len(row) - T + j + 1]
                if len(history) - self.start < self.n - 1:
                    continue
                ban = self.banned(history)
                if ban:
                    if out is logits:
                        out = logits.clone()
                    out[i, j, ban] = float("-inf")
        return out


def sentence_ends(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose text ends a sentence: ".", "!" or "?" last (closing quotes and
    brackets aside), not an ellipsis."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ends = set()
    for i, text in enumerate(texts):
        body = text.rstrip().rstrip(CLOSERS)
        if body.endswith((".", "!", "?")) and not body.endswith("..") and i not in tokenizer.all_special_ids:
            ends.add(i)
    return frozenset(ends)
