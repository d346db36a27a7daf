"""The LLM arm against real engines: vLLM's pooling runner vs the transformers backend through the Ray
Data engine, and the OpenAI-compatible client against vLLM's own OpenAI server (started here, once, on
a tiny random Llama: its answers are noise, so these tests check the protocol, batching, retries,
caching, timeouts and abstention counting, not the answers)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
from scdrugmap_ray.engine.data.splits import Fold
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.llm.client import HttpChatBackend
from scdrugmap_ray.engine.llm.predict import PromptSettings, predict_prompts
from scdrugmap_ray.engine.models.llama import Llama
from scdrugmap_ray.serve.proxy import free_port

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"


class VllmServer:
    """vLLM's OpenAI-compatible server in a subprocess (its own process group), on localhost."""

    def __init__(self, checkpoint: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "2048", "--seed", "0", "--uvicorn-log-level", "warning"]
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._ready = False

    def wait(self, timeout: float = 400) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                self._ready = httpx.get(f"{self.url}/models", timeout=2).status_code == 200
            if not self._ready:
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM server not up after {timeout}s:\n{self.log.read_text()[-3000:]}")
                time.sleep(1)
        return self.url

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny() -> Path:
    return Llama(preset="tiny").checkpoint_dir()


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """Started at the module's first test and shared; tests call .wait() when they need it, so its
    start-up overlaps the engine test."""
    srv = VllmServer(tiny, tmp_path_factory.mktemp("vllm") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def store(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CellStore:
    import anndata as ad

    src = ad.read_h5ad(shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad")
    root = tmp_path_factory.mktemp("pc9")
    src[:80].copy().write_h5ad(root / "pc9.h5ad")
    convert_h5ad(root / "pc9.h5ad", root / "store",
                 ConvertOptions(label_key="scdeal_label", dataset="PC9", shard_cells=50), progress=False)
    return CellStore.open(root / "store")


def test_vllm_pooling_agrees_with_transformers_in_the_engine(
    ray_session: None, store: CellStore, tiny: Path, server: VllmServer
) -> None:
    from scdrugmap_ray.engine.pipeline.embed import embed_store

    ids = store.obs(["cell_id"])["cell_id"].tolist()[:40]
    out = {}
    for backend in ("vllm", "transformers"):
        m = Llama(checkpoint=str(tiny), top_k=100, backend=backend)
        out[backend], stats = embed_store(m, store, cell_ids=ids, return_stats=True, batch_tokens=4096)
        assert stats["tokens"] > 40 * 50
    a, b = out["vllm"], out["transformers"]
    assert a.shape == (40, 128) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
    assert not np.allclose(np.linalg.norm(a, axis=1), 1.0)  # normalisation off, as the paper's mean


def _fold(store: CellStore) -> tuple[pd.DataFrame, Fold]:
    obs = store.obs()
    rows = np.flatnonzero(obs["label"].notna().to_numpy())
    return obs, Fold("pooled", 0, "pooled/cell/fold0", rows[:40], rows[40:44], rows[44:56], "PC9", 0)


def test_http_client_batching_cache_abstentions_and_truncation(
    server: VllmServer, store: CellStore, tiny: Path, tmp_path: Path
) -> None:
    url = server.wait()
    obs, fold = _fold(store)
    settings = PromptSettings(k=2, top_k=300, max_tokens=12, batch_size=5)

    def backend() -> HttpChatBackend:
        return HttpChatBackend(base_url=url, model=MODEL, api_key_env=None, concurrency=3, context_tokens=700,
                               tokenizer=str(tiny), cache_dir=tmp_path / "cache")

    first = predict_prompts(backend(), store, obs, fold, "few_shot", settings, seed=0)
    n = len(fold.test)
    assert first.usage.n_requests == n and first.usage.n_cached == 0
    assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    assert first.n_examples == 2 and len(first.answers) == n and all(a is not None for a in first.answers)
    # every prompt fitted the 700-token context by dropping genes; the server took all of them
    assert (first.genes_dropped > 0).all()
    # noise answers: each is an abstention or a parsed answer, counted, none dropped
    assert first.abstained.sum() + (~first.abstained).sum() == n
    assert np.all(first.p_sensitive[first.abstained] == 0.5)
    again = predict_prompts(backend(), store, obs, fold, "few_shot", settings, seed=0)
    assert again.usage.n_requests == 0 and again.usage.n_cached == n and again.usage.prompt_tokens == 0
    assert again.answers == first.answers and again.usage.cost_usd == 0


class _FlakyProxy:
    """A real HTTP server in front of vLLM: answers the first requests with the given statuses (429 with
    Retry-After, 503...) or hangs, then forwards."""

    def __init__(self, upstream: str | None, plan: list[int | str]) -> None:
        self.plan, self.upstream, self.seen = list(plan), upstream, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.seen += 1
                step = proxy.plan.pop(0) if proxy.plan else "forward"
                if step == "hang":
                    time.sleep(5)
                    return
                if step != "forward":
                    self.send_response(int(step))
                    if step == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                assert proxy.upstream is not None
                r = httpx.post(proxy.upstream + self.path.removeprefix("/v1"), content=body,
                               headers={"Content-Type": "application/json"}, timeout=60)
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Cell: EGFR KRT{i} ACTB"}] for i in range(n)]


def test_retries_on_429_and_5xx(server: VllmServer) -> None:
    proxy = _FlakyProxy(server.wait(), [429, 429, 503])
    try:
        c = HttpChatBackend(base_url=proxy.url, model=MODEL, api_key_env=None, concurrency=1, backoff_s=0.05)
        res, usage = c.complete(_chats(3), {"max_tokens": 4, "temperature": 0.0})
    finally:
        proxy.close()
    assert usage.retries == 3 and proxy.seen == 6
    assert all(r.error is None and r.text is not None for r in res) and usage.completion_tokens > 0


def test_endpoint_down_timeouts_key_and_model(server: VllmServer, monkeypatch: pytest.MonkeyPatch) -> None:
    down = HttpChatBackend(base_url=f"http://127.0.0.1:{free_port()}/v1", model=MODEL, api_key_env=None,
                           max_retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"failed after 3 attempts.*ConnectError"):
        down.complete(_chats(2), {})
    assert time.monotonic() - t0 < 10
    hang = _FlakyProxy(None, ["hang"] * 4)
    try:
        slow = HttpChatBackend(base_url=hang.url, model=MODEL, api_key_env=None, max_retries=1, timeout_s=0.5,
                               backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(UserError, match="ReadTimeout"):
            slow.complete(_chats(1), {})
        assert time.monotonic() - t0 < 5
    finally:
        hang.close()
    monkeypatch.delenv("SCDRUGMAP_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="SCDRUGMAP_TEST_KEY"):
        HttpChatBackend(model="gpt-4o-mini", api_key_env="SCDRUGMAP_TEST_KEY")
    wrong = HttpChatBackend(base_url=server.wait(), model="no-such-model", api_key_env=None)
    with pytest.raises(UserError, match="404"):
        wrong.complete(_chats(1), {"max_tokens": 2})


def test_prompt_strategies_in_a_benchmark(ray_session: None, server: VllmServer, tmp_path: Path) -> None:
    from scdrugmap_ray.jobs.runner import run_benchmark
    from scdrugmap_ray.jobs.spec import parse_spec

    raw = {
        "name": "llm", "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache"),
        "data": [{"name": "sim", "simulate": {"cells": 80, "datasets": 2, "samples_per_dataset": 2,
                                              "genes": 500, "seed": 1}}],
        "models": [{"name": "pca-logreg"},  # frozen only: each model runs the strategies it can
                   {"name": "openai-chat", "options": {"base_url": server.wait(), "model": MODEL,
                                                       "api_key_env": None, "concurrency": 4,
                                                       "context_tokens": 2048}}],
        "strategies": ["frozen", "zero_shot", "few_shot"],
        "prompting": {"k": 2, "top_k": 20, "max_test_cells": 6, "max_tokens": 12},
        "evaluation": {"pooled": {"folds": 2, "split": "sample"}, "bootstrap": 20},
    }
    run_dir = run_benchmark(parse_spec(raw), progress=False)
    res = pd.read_parquet(run_dir / "results.parquet")
    assert set(zip(res["model"], res["strategy"], strict=True)) == {
        ("pca-logreg", "frozen"), ("openai-chat", "zero_shot"), ("openai-chat", "few_shot")}
    p = res[res["model"] == "openai-chat"]
    assert (p["n_prompted"] == 6).all() and (p["prompt_tokens"] > 0).all() and (p["llm_requests"] == 6).all()
    assert p["abstain_rate"].between(0, 1).all() and np.isfinite(p["f1"]).all()
    for _, row in p.iterrows():
        preds = pd.read_parquet(run_dir / "predictions" / f"{row['unit_id']}.parquet")
        preds = preds[preds["fold"] == row["fold"]]
        assert len(preds) == 6 and int(preds["abstained"].sum()) == row["n_abstain"]
        assert preds.loc[preds["abstained"], "abstain_reason"].notna().all()
    assert (p[p.strategy == "few_shot"]["few_shot_examples"] == 2).all()
    # a second run answers from the response cache: no request, no cost
    raw["output"] = str(tmp_path / "run2")
    res2 = pd.read_parquet(run_benchmark(parse_spec(raw), progress=False) / "results.parquet")
    p2 = res2[res2["model"] == "openai-chat"]
    assert (p2["llm_requests"] == 0).all() and (p2["llm_cached"] == 6).all()
    np.testing.assert_array_equal(p2["n_abstain"].to_numpy(), p["n_abstain"].to_numpy())


def test_prompt_command(server: VllmServer, store: CellStore, tmp_path: Path) -> None:
    from scdrugmap_ray.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path / "preds.parquet"
    args = ["prompt", str(store.path), "--out", str(out), "--base-url", server.wait(), "--model", MODEL,
            "--api-key-env", "SCDRUGMAP_TEST_UNSET", "--cells", "5", "--few-shot", "2", "--top-k", "20",
            "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "n_abstain=" in r.output and "requests=5 cached=0" in r.output
    df = pd.read_parquet(out)
    assert len(df) == 5 and {"abstained", "abstain_reason", "answer", "genes_dropped"} <= set(df.columns)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "requests=0 cached=5" in r.output  # the re-run asks nothing
    # the real command line: a missing key is one line, exit status 2, no traceback
    env = {k: v for k, v in os.environ.items() if k != "SCDRUGMAP_TEST_UNSET"}
    bad = subprocess.run([str(Path(sys.executable).parent / "scdrugmap-ray"), "prompt", str(store.path), "--out",
                          str(tmp_path / "x.parquet"), "--api-key-env", "SCDRUGMAP_TEST_UNSET"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "SCDRUGMAP_TEST_UNSET" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.parquet").exists()
