"""``openai-chat``: any chat model behind an OpenAI-compatible HTTP endpoint (GPT-4o-mini in scDrugMap;
vLLM's or any other compatible server), for the ``zero_shot`` and ``few_shot`` strategies.

It produces no embedding: it is prompted (engine/llm). Options are the client's (engine/llm/client.py):
``base_url`` (default the OpenAI API), ``model`` (default gpt-4o-mini), ``api_key_env`` (the NAME of
the environment variable holding the key; the key itself never goes into a YAML file or a result),
``concurrency``, ``max_retries``, ``timeout_s``, ``connect_timeout_s``, ``backoff_s``,
``max_backoff_s``, ``context_tokens`` (prompt + answer limit of the model), ``tokenizer`` (a Hugging
Face tokenizer directory to count prompt tokens exactly; otherwise an upper estimate of 1 token per 3
characters), ``price_in_per_1m`` / ``price_out_per_1m`` (USD per million tokens; known for
gpt-4o-mini), ``json_mode`` (ask for ``response_format: json_object``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..errors import UserError
from ..llm.client import OPENAI_URL, HttpChatBackend
from .base import Model, register


@register
class OpenAIChat(Model):
    name = "openai-chat"
    default_options: ClassVar[dict[str, Any]] = {
        "base_url": OPENAI_URL,
        "model": "gpt-4o-mini",
        "api_key_env": "OPENAI_API_KEY",
        "concurrency": 8,
        "max_retries": 5,
        "timeout_s": 60.0,
        "connect_timeout_s": 10.0,
        "backoff_s": 1.0,
        "max_backoff_s": 30.0,
        "context_tokens": 128_000,
        "tokenizer": None,
        "price_in_per_1m": None,
        "price_out_per_1m": None,
        "json_mode": False,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(self.options["model"], str) or not self.options["model"]:
            raise UserError("openai-chat: option 'model' must name the served model (e.g. gpt-4o-mini)")

    def identity(self) -> dict[str, Any]:
        # the connection settings do not change answers; the endpoint and model do
        return {"name": self.name, "base_url": self.options["base_url"], "model": self.options["model"]}

    def chat_backend(self, cache_dir: Path | None) -> HttpChatBackend:
        return HttpChatBackend(**self.options, cache_dir=cache_dir)
