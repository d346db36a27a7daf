"""Chat backends for the prompted strategies: any OpenAI-compatible HTTP endpoint, and vLLM offline.

Both take a list of chats and return one ``ChatResult`` per chat, in order. Shared by both:

* a response cache keyed by the SHA-256 of (backend identity, model, messages, sampling settings): a
  re-run of a benchmark asks nothing again and costs nothing (``ResponseCache``: one small JSON file per
  answer under the cache directory, written atomically, safe for concurrent runs);
* token accounting from the server's ``usage`` (or vLLM's token ids), and cost from per-million-token
  prices (known for gpt-4o-mini; settable for any model).

The HTTP client (``HttpChatBackend``) sends requests concurrently (at most ``concurrency`` in flight),
retries 429 and 5xx answers and connection failures with exponential backoff (honouring
``Retry-After``), and has connect/read timeouts, so a down endpoint is a clear one-line error after the
retries, never a hang. A 400 answer to one chat (e.g. a prompt over the model's context) is recorded as
that chat's abstention; 401/403/404 stop the run with what to fix.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import UserError
from ..fsutil import atomic_file
from ..runtime import user_error_in
from .hf import hf_tokenizer, read_config

log = logging.getLogger(__name__)

#: USD per 1M (input, output) tokens, list prices
PRICES: dict[str, tuple[float, float]] = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00)}
OPENAI_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass
class ChatResult:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None  # a per-chat failure (recorded as an abstention)


@dataclass
class Usage:
    """Token and cost totals of one batch of chats (cached answers cost nothing in this run)."""

    n_requests: int = 0
    n_cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def chat_key(identity: dict[str, Any], messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    blob = json.dumps({"backend": identity, "messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root else None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> ChatResult | None:
        if self.root is None:
            return None
        p = self._path(key)
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return ChatResult(d.get("text"), int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)), True)

    def put(self, key: str, res: ChatResult) -> None:
        if self.root is None or res.error is not None:
            return  # failures are asked again next time

        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(p) as tmp:
            Path(tmp).write_text(json.dumps({"text": res.text, "prompt_tokens": res.prompt_tokens,
                                             "completion_tokens": res.completion_tokens}))


def price_of(model: str, price_in: float | None, price_out: float | None) -> tuple[float, float] | None:
    if price_in is not None and price_out is not None:
        return float(price_in), float(price_out)
    return PRICES.get(model)


class ChatBackend:
    """What the prompted strategies need of a chat model."""

    identity: dict[str, Any]
    model: str

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of a chat (exact with the model's tokenizer, else an upper estimate)."""
        return sum(len(m["content"]) for m in messages) // 3 + 8 * len(messages)

    @property
    def context_tokens(self) -> int:
        return 128_000

    def complete(self, chats: Sequence[list[dict[str, str]]], params: dict[str, Any]) -> tuple[list[ChatResult], Usage]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (an engine, a connection pool)."""


def chat_length(tok: Any, messages: list[dict[str, str]]) -> int:
    """Prompt tokens of a chat under the tokenizer's chat template (transformers 5 returns a dict)."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return len(ids)


def _with_cache(backend: ChatBackend, cache: ResponseCache, chats: Sequence[list[dict[str, str]]],
                params: dict[str, Any]) -> tuple[list[ChatResult | None], list[str], list[int]]:
    keys = [chat_key(backend.identity, c, params) for c in chats]
    results: list[ChatResult | None] = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    return results, keys, todo


class HttpChatBackend(ChatBackend):
    def __init__(self, *, base_url: str = OPENAI_URL, model: str = "gpt-4o-mini",
                 api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 8, max_retries: int = 5,
                 timeout_s: float = 60.0, connect_timeout_s: float = 10.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, context_tokens: int = 128_000, tokenizer: str | None = None,
                 price_in_per_1m: float | None = None, price_out_per_1m: float | None = None,
                 json_mode: bool = False, cache_dir: Path | None = None) -> None:
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"base_url {base_url!r} is not an http(s) URL (e.g. {OPENAI_URL} or http://HOST:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        key = os.environ.get(api_key_env) if api_key_env else None
        local = parsed.hostname in ("localhost", "127.0.0.1", "::1")
        if api_key_env and not key and not local:
            raise UserError(
                f"no API key: set the environment variable {api_key_env} (the key of {self.base_url}), or name "
                "another variable with api_key_env"
            )
        self._key = key
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._context = int(context_tokens)
        self.tokenizer = tokenizer
        self.price = price_of(model, price_in_per_1m, price_out_per_1m)
        self.json_mode = bool(json_mode)
        self.cache = ResponseCache(cache_dir)
        self.identity = {"kind": "openai-http", "base_url": self.base_url, "model": model}

    @property
    def context_tokens(self) -> int:
        return self._context

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        if self.tokenizer:
            tok = hf_tokenizer(self.tokenizer)
            if getattr(tok, "chat_template", None):
                return chat_length(tok, messages)
            return sum(len(tok(m["content"])["input_ids"]) + 4 for m in messages)
        return super().count_tokens(messages)

    def complete(self, chats: Sequence[list[dict[str, str]]], params: dict[str, Any]) -> tuple[list[ChatResult], Usage]:
        t0 = time.perf_counter()
        results, keys, todo = _with_cache(self, self.cache, chats, params)
        usage = Usage(n_requests=len(todo), n_cached=len(chats) - len(todo))
        if todo:
            fresh = asyncio.run(self._run([chats[i] for i in todo], params, usage))
            for i, res in zip(todo, fresh, strict=True):
                results[i] = res
                self.cache.put(keys[i], res)
                usage.prompt_tokens += res.prompt_tokens
                usage.completion_tokens += res.completion_tokens
        if self.price is not None:
            usage.cost_usd = (usage.prompt_tokens * self.price[0] + usage.completion_tokens * self.price[1]) / 1e6
        elif usage.prompt_tokens or usage.completion_tokens:
            usage.cost_usd = float("nan")  # unknown price: set price_in_per_1m / price_out_per_1m
        usage.seconds = time.perf_counter() - t0
        out = [r for r in results if r is not None]
        assert len(out) == len(chats)
        return out, usage

    async def _run(self, chats: list[list[dict[str, str]]], params: dict[str, Any], usage: Usage) -> list[ChatResult]:
        import httpx

        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, limits=limits) as http:
            async def one(msgs: list[dict[str, str]]) -> ChatResult:
                async with sem:
                    return await self._request(http, msgs, params, usage)

            tasks = [asyncio.create_task(one(c)) for c in chats]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise

    async def _request(self, http: Any, msgs: list[dict[str, str]], params: dict[str, Any], usage: Usage) -> ChatResult:
        import httpx

        body: dict[str, Any] = {"model": self.model, "messages": msgs, **params}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        last = ""
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                r = await http.post("/chat/completions", json=body)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if r.status_code == 200:
                    return _parse_completion(r)
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code in (401, 403):
                    raise UserError(f"{self.base_url} refused the API key (HTTP {r.status_code}); check the key's "
                                    "environment variable")
                if r.status_code == 404:
                    raise UserError(f"{self.base_url}/chat/completions answered 404 for model {self.model!r}: check "
                                    f"base_url and model ({r.text[:150]})")
                if r.status_code not in RETRY_STATUS:
                    return ChatResult(None, error=last)  # this chat only (e.g. 400: prompt too long)
                ra = r.headers.get("retry-after")
                if ra:
                    try:
                        wait = min(self.max_backoff_s, float(ra))
                    except ValueError:
                        wait = None
            if attempt == self.max_retries:
                break
            usage.retries += 1
            if wait is None:
                wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            log.info("chat request failed (%s); retry %d/%d in %.1fs", last, attempt + 1, self.max_retries, wait)
            await asyncio.sleep(wait)
        raise UserError(f"chat endpoint {self.base_url} failed after {self.max_retries + 1} attempts ({last}); is the "
                        "server up and the base_url right?")


def _parse_completion(r: Any) -> ChatResult:
    try:
        d = r.json()
        text = d["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ChatResult(None, error=f"malformed completion: {r.text[:200]}")
    u = d.get("usage") or {}
    return ChatResult(text, int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))


class VllmChatBackend(ChatBackend):
    """vLLM offline (``LLM.chat``) on a Hugging Face chat model directory (LLaMa). Builds its engine in the
    process it runs in: use it inside a Ray actor (``RemoteChatBackend``), never in the driver."""

    def __init__(self, checkpoint: str, *, max_model_len: int | None = None, dtype: str | None = None,
                 cache_dir: Path | None = None, identity: dict[str, Any] | None = None,
                 kv_cache_gb: float = 2) -> None:
        cfg = read_config(Path(checkpoint))
        self.checkpoint = checkpoint
        self.model = Path(checkpoint).name
        self.tok = hf_tokenizer(checkpoint)
        if not getattr(self.tok, "chat_template", None):
            raise UserError(f"{checkpoint}: the tokenizer has no chat template; prompting needs a chat model")
        self._context = int(max_model_len or min(8192, int(cfg.get("max_position_embeddings") or 8192)))
        self.dtype = dtype
        self.kv_cache_gb = kv_cache_gb
        self.cache = ResponseCache(cache_dir)
        self.identity = identity or {"kind": "vllm", "checkpoint": checkpoint}
        self._llm: Any = None

    @property
    def context_tokens(self) -> int:
        return self._context

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return chat_length(self.tok, messages)

    def _engine(self) -> Any:
        if self._llm is None:
            import torch
            from vllm import LLM

            cpu = not torch.cuda.is_available()
            extra: dict[str, Any] = {}
            if cpu:  # as for embeddings (models/llama.py): KV cache size, engine inside this process
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.kv_cache_gb))))
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
                extra["distributed_executor_backend"] = "uni"
            try:
                self._llm = LLM(model=self.checkpoint, dtype=self.dtype or ("float32" if cpu else "bfloat16"),
                                max_model_len=self._context, enforce_eager=cpu, seed=0,
                                gpu_memory_utilization=0.2 if cpu else 0.85, **extra)
            except Exception as err:
                raise UserError(f"vLLM could not load {self.checkpoint}: {str(err).splitlines()[0][:300]}") from None
        return self._llm

    def complete(self, chats: Sequence[list[dict[str, str]]], params: dict[str, Any]) -> tuple[list[ChatResult], Usage]:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        results, keys, todo = _with_cache(self, self.cache, chats, params)
        usage = Usage(n_requests=len(todo), n_cached=len(chats) - len(todo))
        if todo:
            sp = SamplingParams(temperature=float(params.get("temperature", 0.0)),
                                max_tokens=int(params.get("max_tokens", 64)), seed=params.get("seed"))
            outs = self._engine().chat([list(chats[i]) for i in todo], sp, use_tqdm=False)
            for i, o in zip(todo, outs, strict=True):
                res = ChatResult(o.outputs[0].text, len(o.prompt_token_ids or []), len(o.outputs[0].token_ids))
                results[i] = res
                self.cache.put(keys[i], res)
                usage.prompt_tokens += res.prompt_tokens
                usage.completion_tokens += res.completion_tokens
        usage.seconds = time.perf_counter() - t0
        return [r for r in results if r is not None], usage


class RemoteChatBackend(ChatBackend):
    """A ``VllmChatBackend`` living in a Ray actor (one engine per GPU, separate process); the driver
    keeps a tokenizer for counting prompt tokens."""

    def __init__(self, checkpoint: str, **kwargs: Any) -> None:
        import ray

        local = VllmChatBackend.__new__(VllmChatBackend)
        VllmChatBackend.__init__(local, checkpoint, **kwargs)  # validates and loads the tokenizer only
        self._local = local
        self.identity, self.model = local.identity, local.model
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        actor_cls = ray.remote(num_gpus=gpus, num_cpus=0)(VllmChatBackend)
        self._actor = actor_cls.remote(checkpoint, **kwargs)

    @property
    def context_tokens(self) -> int:
        return self._local.context_tokens

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return self._local.count_tokens(messages)

    def complete(self, chats: Sequence[list[dict[str, str]]], params: dict[str, Any]) -> tuple[list[ChatResult], Usage]:
        import ray

        try:
            return ray.get(self._actor.complete.remote(list(chats), params))
        except Exception as err:
            user = user_error_in(err)
            if user is not None:
                raise user from None
            raise

    def close(self) -> None:
        import ray

        ray.kill(self._actor)
