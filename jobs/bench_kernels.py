"""What packing the linear layers for oneDNN (`cdsl.kernels.use_onednn`) buys on this CPU.

    python -m jobs.bench_kernels

For the target and the draft, one forward over 1, 2, 3, 5 and 8 new tokens after a cached
prefix, with MKL's `nn.Linear` and with the packed layers, interleaved, on the same threads;
and the largest logit difference between the two. Verification and search steps are the 2-5
token shapes; greedy decoding is the 1-token one.
"""

from __future__ import annotations

import torch
import typer

from cdsl.config import BUILTIN_DRAFT, BUILTIN_TARGET, ModelConfig
from cdsl.models import LM
from jobs.bench_draft import forward_ms

app = typer.Typer(add_completion=False)


@torch.inference_mode()
def logit_gap(plain: LM, packed: LM) -> float:
    ids = torch.randint(plain.vocab_size // 4, plain.vocab_size, (2, 32))
    a, b = plain.model(input_ids=ids).logits, packed.model(input_ids=ids).logits
    real = a > torch.finfo(a.dtype).min  # a frequent-token head leaves the rest at the lowest value
    return float((a[real] - b[real]).abs().max())


@app.command()
def main(
    target: str = typer.Option(BUILTIN_TARGET, help="Target model."),
    draft: str = typer.Option(BUILTIN_DRAFT, help="Draft model."),
    widths: str = typer.Option("1,2,3,5,8", help="New tokens per forward, comma-separated."),
    reps: int = typer.Option(15, min=1),
    threads: int = typer.Option(2, min=1),
) -> None:
    """Print forward ms per width, MKL against packed oneDNN layers, for the target and the draft."""
    torch.set_num_threads(threads)
    sizes = [int(w) for w in widths.split(",") if w.strip()]
    typer.echo(f"forward ms after a 48-token prefix, {threads} threads, median of {reps}")
    typer.echo(f"{'model':<8} {'layers':<7} " + " ".join(f"{w:>7}" for w in sizes) + "  max |logit diff|")
    for role, path in (("target", target), ("draft", draft)):
        plain = LM.load(ModelConfig(path=path, onednn=False), role)
        packed = LM.load(ModelConfig(path=path), role)
        for lm in (plain, packed):  # warm-up
            forward_ms({"m": lm}, 1, reps=2)
        ms = {w: forward_ms({"mkl": plain, "onednn": packed}, 1, reps, width=w) for w in sizes}
        gap = logit_gap(plain, packed)
        for name in ("mkl", "onednn"):
            row = " ".join(f"{ms[w][name]:7.1f}" for w in sizes)
            typer.echo(f"{role:<8} {name:<7} {row}" + (f"  {gap:.1e}" if name == "onednn" else ""))


if __name__ == "__main__":
    app()
