"""Errors meant for people.

A UserError carries one line saying what is wrong and how to fix it. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """Bad input or configuration that the user can fix. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
