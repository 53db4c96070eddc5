"""Reward model cost per CDLH step, with and without its prompt cache, side by side.

    python -m jobs.bench_reward --dialogues 3

Each step scores k candidates of L + 1 tokens after a dialogue and a prefix that grows by one
word per step, as CDLH does once per emitted token. The same calls go to one model that caches
prompts and one that re-reads the dialogue for every text (`cached_prompts=0`).
"""

from __future__ import annotations

import time

import typer

from cdsl.config import BUILTIN_HARMLESS
from cdsl.reward_model import RewardModel
from cdsl.rewards import RewardInput
from jobs.bench import HARMLESS_DATA, load_harmless

ANSWER = ("I am sorry but I cannot help with that request because it could hurt someone and that is not okay "
          "so let us talk about something else instead").split()
app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(BUILTIN_HARMLESS, help="Reward model: folder, hub id or builtin name."),
    dataset: str = typer.Option(str(HARMLESS_DATA), help="hh-rlhf jsonl whose held-out dialogues are the prompts."),
    dialogues: int = typer.Option(3, min=1),
    steps: int = typer.Option(16, min=2, max=len(ANSWER) - 6),
    k: int = typer.Option(5, min=1, max=26),
    lookahead: int = typer.Option(4, min=1, max=5),
) -> None:
    """Print the reward seconds per step of each model on each dialogue, and the ratio."""
    cached, plain = RewardModel(model), RewardModel(model, cached_prompts=0)
    for prompt in load_harmless(dataset, dialogues, cached.tokenizer, held_out=True):
        seconds = {}
        for name, rm in (("cached", cached), ("plain", plain)):
            start = time.perf_counter()
            for step in range(steps):
                prefix = " " + " ".join(ANSWER[:step])
                rm.score([RewardInput(prompt, prefix, " " + " ".join(ANSWER[step + j: step + j + lookahead]) + f" {c}")
                          for j, c in zip(range(k), "abcdefghijklmnopqrstuvwxyz")])
            seconds[name] = (time.perf_counter() - start) / steps
        tokens = len(cached.tokenizer(prompt).input_ids)
        ratio = seconds["plain"] / seconds["cached"]
        typer.echo(f"dialogue of {tokens} tokens: reward s per step (k={k}, L={lookahead}): cached "
                   f"{seconds['cached']:.3f}, plain {seconds['plain']:.3f} ({ratio:.1f}x)")


if __name__ == "__main__":
    app()
