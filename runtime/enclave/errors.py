"""The one error type of the local enclave runtime, carrying qt's error code when there is one.

Contract: ``str(error)`` is one line, prefixed ``[E<code>]`` when the failure has a qt error code
(``qt enclave`` prints the same numbers); ``check_failed`` tells the CLI to exit 1 (the image or
enclave failed a check: CRC, signature, certificate validity, a failed start) rather than 2 (bad
input or usage).  :meth:`to_message` / :meth:`from_message` carry it across the supervisor's
status pipe.
"""

from __future__ import annotations

__all__ = [
    "E_CID_IN_USE", "E_FILE", "E_INVALID_ARGUMENT", "E_MEMORY", "E_NOT_DEBUG", "E_NOT_RUNNING",
    "EnclaveError",
]

#: qt error codes (Huawei ECS ecs_03_1420) used by the local runtime.
E_INVALID_ARGUMENT = 2
E_FILE = 3
E_MEMORY = 10
E_NOT_RUNNING = 28
E_NOT_DEBUG = 32
E_CID_IN_USE = 43


class EnclaveError(Exception):
    """A refused request or a failed enclave operation; the message names what and why."""

    def __init__(self, message: str, *, code: int | None = None, check_failed: bool = False) -> None:
        self.message = message
        self.code = code
        self.check_failed = check_failed
        super().__init__(f"[E{code:02d}] {message}" if code is not None else message)

    def to_message(self) -> dict:
        return {"error": self.message, "code": self.code, "check_failed": self.check_failed}

    @classmethod
    def from_message(cls, message: dict) -> EnclaveError:
        return cls(str(message.get("error")), code=message.get("code"),
                   check_failed=bool(message.get("check_failed")))
