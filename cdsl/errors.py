"""The one error a request is refused with, whatever the front end."""

from __future__ import annotations


class RequestError(ValueError):
    """A request refused at the door; its message is always "<field>: <problem>", the one
    format every front end shows (the CLI on stderr, HTTP as a 400, a dataset row's `error`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem
