"""The base of every error a user can act on: a stable `code` for programs, a one-line message
(what went wrong, what to do) for people. The API answers them as problems (`problems.py`), the
worker records them as a job's or a model's error, the CLI prints the message."""


class CodedError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
