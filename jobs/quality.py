"""What CommonGen users judge a text by, beside coverage: BLEU-4 and ROUGE-L against the
references (sacrebleu and rouge-score, the `eval` extra), and three checks that need no
references: a repeated word trigram (a loop or a list), exactly one sentence, length in words.

Coverage pays for listing the concepts, and perplexity cannot see a loop; these can.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u201d\u2019]*(?=\s|$)")


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped ("A drill, a field" -> a drill a field)."""
    return WORDS.findall(text.lower())


def repeats_trigram(text: str) -> bool:
    """Whether some word trigram occurs twice ("a drill, a field, a drill, a field")."""
    w = words(text)
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return len(grams) != len(set(grams))


def sentences(text: str) -> int:
    """Sentences in `text`: runs of words closed by ".", "!" or "?" (an unclosed tail counts)."""
    parts = [p for p in SENTENCE_END.split(text.strip()) if words(p)]
    return len(parts)


def one_sentence(text: str) -> bool:
    """Exactly one sentence, and it is closed by its final mark."""
    body = text.strip()
    closed = [m.end() for m in SENTENCE_END.finditer(body)][-1:] == [len(body)]
    return closed and sentences(body) == 1


def reference_scores(texts: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, every reference of a set at once) and mean ROUGE-L F1 (the best
    reference per text), both 0-100; empty where no text has references or the `eval` extra
    (sacrebleu, rouge-score) is not installed."""
    pairs = [(t, list(r)) for t, r in zip(texts, references) if r]
    if not pairs:
        return {}
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        return {}
    hyps = [t for t, _ in pairs]
    most = max(len(r) for _, r in pairs)
    streams = [[r[i] if i < len(r) else None for _, r in pairs] for i in range(most)]  # None: fewer refs
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(r, t)["rougeL"].fmeasure for t, r in pairs) / len(pairs)
    return {"bleu4": bleu, "rouge_l": 100 * rouge}


def quality(texts: Sequence[str], references: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """The quality figures of a set of outputs: shares in [0, 1], mean words, and the reference
    scores where there are references."""
    n = max(1, len(texts))
    out = {"repeated_trigram_share": sum(map(repeats_trigram, texts)) / n,
           "one_sentence_share": sum(map(one_sentence, texts)) / n,
           "mean_words": sum(len(words(t)) for t in texts) / n}
    return {**out, **reference_scores(texts, references or [])}
