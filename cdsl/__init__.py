"""CDSL: constrained decoding with speculative lookaheads."""
