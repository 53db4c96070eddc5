"""`jobs.generate` with replicas that die on one row: fault injection kept out of the job itself.

    python -m tests.chaos_generate POISON [jobs.generate options...]

Runs the job on a local Ray whose every worker process starts with `Replica._submit` wrapped:
a replica that meets a row holding the concept POISON exits at once, as one whose row crashes it
would.
"""

from __future__ import annotations

import os
import sys

import ray

import jobs.generate as generate


def arm(poison: str) -> None:
    """Wrap `Replica._submit` in this process (Ray runs it as each worker starts)."""
    from jobs.replica import Replica

    submit = Replica._submit

    def dying(self, method: str, row: dict):
        if poison in (row.get("concepts") or []):
            os._exit(1)
        return submit(self, method, row)

    Replica._submit = dying


def main() -> None:
    poison, args = sys.argv[1], sys.argv[2:]
    connect = generate.connect

    def armed(config, replicas: int) -> None:
        hook = {"worker_process_setup_hook": lambda: arm(poison)}
        real_init = ray.init
        ray.init = lambda *a, **kw: real_init(*a, **kw, runtime_env=hook)
        try:
            connect(config, replicas)
        finally:
            ray.init = real_init

    generate.connect = armed
    sys.argv = [sys.argv[0], *args]
    generate.app()


if __name__ == "__main__":
    main()
