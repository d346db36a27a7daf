"""Errors meant for people.

A UserError carries one line saying what is wrong and how to fix it. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback.
"""

from typing import Any


class UserError(Exception):
    """Bad input or configuration that the user can fix. The message is one line."""

    def __init__(self, message: str) -> None:
        self.message = " ".join(str(message).split())
        super().__init__(self.message)

    def __str__(self) -> str:
        # Ray Data appends its retry hint to a failed map's exception args; the user's line stays as written.
        # (Ray's RayTaskError(UserError) twin class never ran this __init__: it has no ``message``.)
        message = getattr(self, "message", None)
        return message if message is not None else super().__str__()

    def __reduce__(self) -> tuple[Any, ...]:
        message = getattr(self, "message", None)
        return (type(self), (message,)) if message is not None else super().__reduce__()
