"""What every decoding method shares: the two decoders, the output so far, the reward."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from cdsl.config import DecodeConfig
from cdsl.decoder import Decoder, Runner
from cdsl.models import LM, Codec
from cdsl.rewards import Reward, RewardInput
from cdsl.rules import NoRepeat
from cdsl.sampling import Picker
from cdsl.stats import Role, Stats


@dataclass
class Generation:
    """The result of one generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    """"eos" when the model ended the text, "stop" when a stop rule did (the end of the first
    sentence, `DecodeConfig.stop`), "length" when max_new_tokens did."""
    stats: Stats = field(default_factory=Stats)
    reward: float | None = None
    """R(prompt, text) of the final text under the request's constraints; None without any."""

    def to_dict(self) -> dict:
        out = {"text": self.text, "finish_reason": self.finish_reason, "stats": self.stats.to_dict()}
        return out if self.reward is None else {**out, "reward": self.reward}


def ends_at_sentence(config: DecodeConfig, reward: Reward | None) -> bool:
    """Whether the text ends at its first sentence end: `stop` "sentence", or "auto" for a task
    whose answer is one sentence (a reward that says `one_sentence`, such as CommonGen coverage)."""
    return config.stop == "sentence" or (config.stop == "auto" and bool(getattr(reward, "one_sentence", False)))


class RewardsLater:
    """A reward call in flight: `done()` says whether it has answered, calling it waits for the
    scores (counted once, however often it is called)."""

    def __init__(self, stats: Stats, texts: int, future: Future | None = None, scores: torch.Tensor | None = None
                 ) -> None:
        self.stats, self.texts, self.future, self.scores = stats, texts, future, scores
        self.start, self.counted = time.perf_counter(), future is None  # scored here: counted there

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def __call__(self) -> torch.Tensor:
        if self.scores is None:
            try:
                self.scores = torch.tensor(self.future.result(), dtype=torch.float32)
            finally:
                if not self.counted:
                    self.counted = True
                    self.stats.count_reward(self.texts, time.perf_counter() - self.start)
        return self.scores


class Context:
    """One generation in flight. `out` is the emitted text's token ids; each decoder's `ids`
    is prompt + out (+ speculative tokens inside a round)."""

    def __init__(self, prompt: str, target: LM | Runner, draft: LM | Runner | None, reward: Reward | None,
                 config: DecodeConfig, codec: Codec | None = None, key: str = "seq",
                 out: list[int] = (), stats: Stats | None = None) -> None:
        """`target`/`draft`: a model in this process, or a `Runner` that reaches one elsewhere
        (then `codec` is the shared tokenizer). `key` names this generation's caches; `out`
        resumes after tokens already emitted, adding to `stats`."""
        self.prompt, self.config, self.reward = prompt, config, reward
        self.stats = stats or Stats()
        self.pick = Picker(config.temperature, config.seed)
        self.lm = codec or target
        ids = self.lm.prompt_ids(prompt)
        self.lm.check_fits(len(ids), config.max_new_tokens)  # out counts against max_new_tokens
        self.n_prompt = len(ids)
        self.out: list[int] = list(out)
        rule = NoRepeat(config.no_repeat_ngram, len(ids), self.lm.word_keys) if config.no_repeat_ngram else None
        self.target = Decoder(target, ids + self.out, self.stats, Role.target, key, rule)
        self.draft = Decoder(draft, ids + self.out, self.stats, Role.draft, key, rule) if draft is not None else None
        self.eos = set(self.lm.eos_ids)
        """Token ids that end the text unwritten."""
        self.stops = self.lm.sentence_end_ids if ends_at_sentence(config, reward) else frozenset()
        """Token ids that end the text after being written (the end of its first sentence)."""
        self.ends = self.eos | self.stops
        """Every token id after which nothing is generated."""
        self.finish_reason: str | None = None
        self.on_emit = None
        """Called with each batch of newly emitted token ids (streaming)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def base(self) -> int:
        """Length of prompt + emitted tokens: where the next round starts."""
        return self.n_prompt + len(self.out)

    @property
    def budget(self) -> int:
        return self.config.max_new_tokens - len(self.out)

    def emit(self, tokens: list[int]) -> None:
        """Append tokens to the output, stopping at EOS or the token budget."""
        start = len(self.out)
        for tok in tokens:
            if tok in self.eos:
                self.finish_reason = "eos"
                break
            self.out.append(tok)
            self.stats.tokens += 1
            if tok in self.stops:
                self.finish_reason = "stop"
                break
            if self.budget <= 0:
                self.finish_reason = "length"
                break
        if self.on_emit is not None and len(self.out) > start:
            self.on_emit(self.out[start:])

    def cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """Tokens up to EOS (not included) or a stop token (included), and whether the text ends
        with them."""
        for i, tok in enumerate(tokens):
            if tok in self.eos:
                return tokens[:i], True
            if tok in self.stops:
                return tokens[: i + 1], True
        return tokens, len(tokens) >= self.budget

    def reward_inputs(self, continuations: list[list[int]]) -> list[RewardInput]:
        prefix = self.lm.decode(self.out)
        items = []
        for cont in continuations:
            kept, final = self.cut(cont)
            full = self.lm.decode(self.out + kept)
            items.append(RewardInput(self.prompt, prefix, full[len(prefix):], final))
        return items

    def rewards(self, continuations: list[list[int]]) -> torch.Tensor:
        """R(prompt, output + continuation) for each continuation of the current output."""
        with self.stats.reward_call(len(continuations)):
            scores = self.reward.score(self.reward_inputs(continuations))
        return torch.tensor(scores, dtype=torch.float32)

    def rewards_later(self, continuations: list[list[int]]) -> RewardsLater:
        """`rewards`, sent now and waited for when the result is called, where the reward is
        scored elsewhere (`submit`); computed at once otherwise."""
        if not hasattr(self.reward, "submit"):
            return RewardsLater(self.stats, len(continuations), scores=self.rewards(continuations))
        return RewardsLater(self.stats, len(continuations), self.reward.submit(self.reward_inputs(continuations)))

    def close(self) -> None:
        """Free the caches this generation holds."""
        for dec in (self.target, self.draft):
            if dec is not None:
                dec.close()

    def result(self) -> Generation:
        """The generation, scored by its reward (outside the stats: the score judges the answer,
        it does not steer it)."""
        text = self.lm.decode(self.out)
        reward = None if self.reward is None else self.reward.score([RewardInput(self.prompt, text, final=True)])[0]
        return Generation(text, list(self.out), self.finish_reason or "length", self.stats, reward)
