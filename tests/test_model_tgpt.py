"""tGPT: sentences of top genes on real cells (hand-checked tokens, and the original tokenizer itself run
on plain-Python rankings), strict loading of the official checkpoint layout, the embedding rule of the
original's feature extraction, batch independence, presets against the original's config.

The official tokenizer (GPL-3) is read from ../shared/assets/tgpt/ only; the package never ships it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from realcells import cells as _cells
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.tgpt import (
    TOKENIZER_FILES,
    TgptModel,
    gpt2_config,
    read_vocabulary,
    rewrite_symbol,
)

TOKENIZER = "assets/tgpt"
#: rows of the real file: long cells (0, 1, 2), a tie across the 62-gene cut (181), short cells (794: 5
#: genes; 1209: mitochondrial genes first), 1686 (its only gene is MT-RNR2), 1741 (ribosomal + pseudogene)
ROWS = [0, 1, 2, 181, 208, 794, 1209, 1604, 1686, 1741]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real(pc9: dict, shared_dir: Path) -> dict:
    return {**pc9}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """tiny GPT-2 body with the REAL tGPT tokenizer (copied from the shared assets)."""
    return TgptModel.init_random(tmp_path_factory.mktemp("tgpt") / "tiny", "tiny",
                                 {"tokenizer_dir": str(shared_dir / TOKENIZER)})


@pytest.fixture(scope="module")
def hf_tokenizer(shared_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(shared_dir / TOKENIZER))


@pytest.fixture(scope="module")
def vocab(shared_dir: Path) -> dict[str, int]:
    return json.loads((shared_dir / TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"]


def _model(path: Path, **options) -> TgptModel:
    return get_model("tgpt", {"checkpoint": str(path), **options})  # type: ignore[return-value]


# --------------------------------------------------------------- the original's input, written out plainly


def _excluded(symbol: str) -> bool:
    """Mitochondrial (MT-) and cytosolic ribosomal protein genes, spelled out without the module's regex."""
    if symbol.startswith("MT-"):
        return True
    if symbol in ("RPLP0", "RPLP1", "RPLP2", "RPSA"):
        return True
    for head in ("RPL", "RPS"):
        if symbol.startswith(head):
            rest = symbol[3:]
            digits = len(rest) - len(rest.lstrip("0123456789"))
            tail = rest[digits:]
            if digits and (tail == "" or (tail[0] in "AXY" and (tail[1:] == "" or tail[1:].isdigit()))):
                return True
    return False


def reference_sentence(symbols: list[str], gi: np.ndarray, vals: np.ndarray, exclude: bool = False,
                       vocab: dict[str, int] | None = None) -> str:
    """The line tGPT's LineDataset would get for a cell: expressed genes by count descending (ties in
    store order, with sorted()), '-' and '.' rewritten to '_', space-joined; all genes, untruncated.
    With ``vocab``, genes whose symbol is not in it are dropped (unknown_genes="drop")."""
    pairs = [(symbols[g], float(v), int(g)) for g, v in zip(gi.tolist(), vals.tolist(), strict=True) if v > 0]
    if exclude:
        pairs = [p for p in pairs if not _excluded(p[0])]
    ranked = sorted(pairs, key=lambda p: (-p[1], p[2]))
    words = [p[0].replace("-", "_").replace(".", "_") for p in ranked]
    if vocab is not None:
        words = [w for w in words if w in vocab]
    return " ".join(words)


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_hand_checked_first_cell(real: dict, ckpt: Path) -> None:
    """Cell CGTTAGCACGTT (21,054 counts, 5,167 genes). Its highest counts: MT-RNR2 292, FTL 223, HSP90AA1
    188, RPLP1 169, MT-CO3 151, MT-CO1 126, FTH1 116, MT-CO2 113, MT-ND4 104, RPL37 100, GSTP1 98, ...;
    without the mitochondrial and ribosomal genes: FTL, HSP90AA1, FTH1, GSTP1 98, MALAT1 91, GAPDH 86,
    PABPC1 79, TMSB4X 76 -> ids 13, 25, 5, 89, 13737, 15, 50, 4 in tGPT's tokenizer.json."""
    ids, gi, vals = _cells(real, [0])
    assert float(vals[0].sum()) == 21054.0
    t = _model(ckpt, exclude_genes="mito_ribo").make_tokenizer(real["genes"])(ids, gi, vals)["input_ids"][0]
    assert t.dtype == np.int32 and len(t) == 64  # </b> + 62 genes + </s>
    assert t[0] == 1 and t[-1] == 2
    assert t[1:9].tolist() == [13, 25, 5, 89, 13737, 15, 50, 4]
    # the default (exclude_genes="none", as upstream, which filters nothing): MT_RNR2 is not in the
    # vocabulary (<unk> = 3), RPLP1 is (12152). (Before issue 15 the default was mito_ribo.)
    assert _model(ckpt).options["exclude_genes"] == "none"
    raw = _model(ckpt).make_tokenizer(real["genes"])(ids, gi, vals)["input_ids"][0]
    assert raw[1:9].tolist() == [3, 13, 25, 12152, 3, 3, 5, 3]


@pytest.mark.parametrize("exclude_genes,unknown_genes", [("mito_ribo", "unk"), ("none", "unk"), ("mito_ribo", "drop")])
def test_tokens_equal_original_tokenizer_on_real_cells(real: dict, ckpt: Path, hf_tokenizer, vocab: dict,
                                                       exclude_genes: str, unknown_genes: str) -> None:
    """The original: tokenizer(lines, max_length=64, truncation=True, padding=True) on the ranked lines.
    Our per-cell tokens, and the collated batch, are the same tensors."""
    model = _model(ckpt, exclude_genes=exclude_genes, unknown_genes=unknown_genes)
    ids, gi, vals = _cells(real, ROWS)
    ours = model.make_tokenizer(real["genes"])(ids, gi, vals)["input_ids"]
    lines = [
        reference_sentence(real["symbols"], g, v, exclude_genes != "none", vocab if unknown_genes == "drop" else None)
        for g, v in zip(gi, vals, strict=True)
    ]
    enc = hf_tokenizer(lines, max_length=64, truncation=True, padding=True, return_tensors="pt")
    for row, tokens, want, mask in zip(ROWS, ours, enc["input_ids"], enc["attention_mask"], strict=True):
        assert tokens.tolist() == want[mask.bool()].tolist(), f"row {row}"
    batch = model.collate({"input_ids": ours})
    assert torch.equal(batch["input_ids"], enc["input_ids"])
    assert torch.equal(batch["attention_mask"], enc["attention_mask"])
    if exclude_genes == "mito_ribo":
        assert ours[ROWS.index(1686)].tolist() == [1, 2]  # MT-RNR2 only: no gene left


def test_symbol_words_equal_tokenizers(real: dict, shared_dir: Path) -> None:
    """Each store symbol's words and ids (the per-gene lookup) equal the `tokenizers` library's encoding
    of that rewritten symbol, for all 21,207 genes of the real data and some awkward names."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(shared_dir / TOKENIZER / "tokenizer.json"))
    voc = read_vocabulary(shared_dir / TOKENIZER)
    names = [*real["symbols"], "HLA-DRB1", "RP11-34P13.7", "E/F", "A+B", "C1orf(12)", "x y", "ÄBC-1"]
    rewritten = [rewrite_symbol(s) for s in names]
    encoded = tk.encode_batch(rewritten, add_special_tokens=False)
    for sym, enc in zip(rewritten, encoded, strict=True):
        assert voc.encode_symbol(sym) == enc.ids, sym
    assert voc.prefix == (1,) and voc.suffix == (2,) and voc.pad_id == 0 and voc.unk_id == 3
    assert voc.size == 21150


def test_ties_truncation_and_multiword_symbols(ckpt: Path, vocab: dict) -> None:
    """Hand-made genes: equal counts keep store order; MT-CO1 and RPL13 are left out (not RPL13AP5);
    a symbol of several words ('FOO/BAR' -> FOO, /, BAR: 3 tokens) may be cut by the truncation,
    as the original truncates tokens, not genes."""
    genes = pd.DataFrame(
        {
            "position": list(range(8)),
            "symbol": ["GAPDH", "ACTB", "HLA-B", "MT-CO1", "RPL13", "FOO/BAR", "B2M", "RPL13AP5"],
            "ensembl_id": [None] * 8,
        }
    )
    counts = np.array([5, 9, 5, 50, 40, 7, 5, 6], dtype=np.float32)
    cell = (np.array(["c"]), [np.arange(8, dtype=np.int32)], [counts])
    tok = _model(ckpt, min_coverage=0.0, exclude_genes="mito_ribo").make_tokenizer(genes)
    got = tok(*cell)["input_ids"][0].tolist()
    # ACTB 9, FOO/BAR 7 (3 words: FOO, BAR unknown -> <unk>, '/' unknown), RPL13AP5 6, then the 5s in
    # store order: GAPDH, HLA_B, B2M
    unk = 3
    want = [vocab["ACTB"], unk, unk, unk, vocab["RPL13AP5"], vocab["GAPDH"], vocab["HLA_B"], vocab["B2M"]]
    assert got == [1, *want, 2]
    assert tok.report["n_excluded"] == 2
    short_tok = _model(ckpt, min_coverage=0.0, max_len=5, exclude_genes="mito_ribo").make_tokenizer(genes)
    short = short_tok(*cell)["input_ids"][0].tolist()
    assert short == [1, vocab["ACTB"], unk, unk, 2]  # 3 gene tokens: FOO/BAR cut after two of its words


def test_tokenizer_is_per_cell(real: dict, ckpt: Path) -> None:
    tok = _model(ckpt).make_tokenizer(real["genes"])
    ids, gi, vals = _cells(real, ROWS)
    together = tok(ids, gi, vals)["input_ids"]
    for i in range(len(ROWS)):
        alone = tok(ids[i : i + 1], gi[i : i + 1], vals[i : i + 1])["input_ids"][0]
        assert np.array_equal(alone, together[i])
    perm = np.random.default_rng(0).permutation(len(gi[3]))  # gene order within a cell does not matter
    assert np.array_equal(tok(ids[3:4], [gi[3][perm]], [vals[3][perm]])["input_ids"][0], together[3])


def test_coverage_report_and_refusal(real: dict, ckpt: Path) -> None:
    model = _model(ckpt, exclude_genes="mito_ribo")
    report = model.vocabulary_coverage(real["genes"])
    assert report["n_store_genes"] == 21207 and report["n_in_vocabulary"] == 13079
    assert report["n_excluded"] == 105  # 34 MT- genes and 71 ribosomal protein genes of this annotation
    mouse = pd.DataFrame({"position": [0, 1, 2], "symbol": ["Actb", "Gapdh", "Xist"], "ensembl_id": [None] * 3})
    with pytest.raises(UserError, match="vocabulary"):
        model.make_tokenizer(mouse)
    # Ensembl IDs where the symbols should be: named through org.Hs.eg.db
    ids_only = pd.DataFrame({"position": [0, 1, 2], "symbol": ["ENSG00000111640", "ENSG00000075624.17", None],
                             "ensembl_id": [None, None, "ENSG00000166710"]})
    tok = model.make_tokenizer(ids_only)  # GAPDH, ACTB, B2M
    assert tok.coverage == 1.0
    out = tok(np.array(["c"]), [np.array([0, 1, 2], dtype=np.int32)], [np.array([3, 2, 1], dtype=np.float32)])
    assert out["input_ids"][0].tolist() == [1, 15, 6, 10, 2]


# ------------------------------------------------------------------------------------------ embedding


def test_embedding_rule_of_the_original(real: dict, ckpt: Path, hf_tokenizer) -> None:
    """The README's feature extraction, run as written: GPT2LMHeadModel.from_pretrained(ckpt).transformer
    on the original tokenizer's padded batch, then hidden[1 : mask.sum() - 1].mean(0) per cell."""
    from transformers import GPT2LMHeadModel

    model = _model(ckpt)
    rows = [0, 181, 794, 1209, 1741]
    ids, gi, vals = _cells(real, rows)
    lines = [reference_sentence(real["symbols"], g, v) for g, v in zip(gi, vals, strict=True)]
    batch = hf_tokenizer(lines, max_length=64, truncation=True, padding=True, return_tensors="pt")
    original = GPT2LMHeadModel.from_pretrained(str(ckpt)).transformer.eval()
    with torch.inference_mode():
        xx = original(**batch).last_hidden_state
        eos = batch["attention_mask"].sum(dim=1) - 1
        want = torch.stack([xx[j, 1 : int(eos[j])].mean(dim=0) for j in range(len(rows))])
        tokens = model.make_tokenizer(real["genes"])(ids, gi, vals)["input_ids"]
        got = model.embed(model.load(), model.collate({"input_ids": tokens}))
    assert got.shape == (5, 64) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)


def test_batch_independence(real: dict, ckpt: Path) -> None:
    model = _model(ckpt, exclude_genes="mito_ribo")  # cell 1686 then has no gene token (the zero-row case)
    module = model.load()
    cells = model.make_tokenizer(real["genes"])(*_cells(real, ROWS))["input_ids"]  # lengths 2..64
    with torch.inference_mode():
        batch = model.embed(module, model.collate({"input_ids": cells}))
        padded = model.embed(module, model.collate({"input_ids": cells[::-1]}, pad_to=model.max_length))
        for i, c in enumerate(cells):
            alone = model.embed(module, model.collate({"input_ids": [c]}))
            assert torch.allclose(alone[0], batch[i], atol=1e-5)
            assert torch.allclose(alone[0], padded[len(cells) - 1 - i], atol=1e-5)
    assert torch.isfinite(batch).all()
    assert torch.equal(batch[ROWS.index(1686)], torch.zeros(64))  # no gene token: zeros, not NaN


def test_bfloat16_module_gives_float32_embeddings(real: dict, ckpt: Path) -> None:
    """The pipeline's GPU setting (bf16 weights) on CPU: float32 output close to the fp32 embedding."""
    model = _model(ckpt)
    batch = model.collate(model.make_tokenizer(real["genes"])(*_cells(real, [0, 181])))
    with torch.inference_mode():
        full = model.embed(model.load(), batch)
        # option dtype: upstream (default) keeps float32 whatever the caller asks; engine takes it
        assert next(model.load(dtype=torch.bfloat16).parameters()).dtype == torch.float32
        half = model.embed(_model(ckpt, dtype="engine").load(dtype=torch.bfloat16), batch)
        assert torch.equal(model.embed(_model(ckpt, dtype="bfloat16").load(), batch), half)
    assert half.dtype == torch.float32 and next(model.load().parameters()).dtype == torch.float32
    assert torch.allclose(half, full, atol=0.1)
    assert not torch.equal(half, full)


def test_collate_pads_to_longest(ckpt: Path) -> None:
    model = _model(ckpt)
    rows = {"input_ids": [np.array([1, 5, 6, 2], dtype=np.int32), np.array([1, 2], dtype=np.int32)]}
    b = model.collate(rows)
    assert b["input_ids"].tolist() == [[1, 5, 6, 2], [1, 2, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["lengths"].tolist() == [4, 2]
    assert model.collate(rows, pad_to=64)["input_ids"].shape == (2, 64)
    with pytest.raises(ValueError):
        model.collate(rows, pad_to=3)


# ---------------------------------------------------------------------------------------- checkpoints


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_init_random_official_layout(ckpt: Path, shared_dir: Path) -> None:
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["RANDOM_WEIGHTS.json", "config.json", "pytorch_model.bin", *TOKENIZER_FILES]
    )
    for f in TOKENIZER_FILES:  # the official tokenizer travels with the checkpoint, byte for byte
        assert (ckpt / f).read_bytes() == (shared_dir / TOKENIZER / f).read_bytes()
    marker = json.loads((ckpt / RANDOM_WEIGHTS_MARKER).read_text())
    assert marker["model"] == "tgpt" and marker["preset"] == "tiny" and "random" in marker["note"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (21150, 1, 2, 0)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    per_layer = ["ln_1.weight", "ln_1.bias", "attn.bias", "attn.masked_bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
                 "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    want = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "lm_head.weight", *(f"transformer.h.{i}.{k}" for i in range(2) for k in per_layer)}
    assert set(state) == want
    assert tuple(state["transformer.wte.weight"].shape) == (21150, 64)
    assert tuple(state["transformer.h.0.attn.c_attn.weight"].shape) == (64, 192)  # Conv1D: [in, out]
    assert tuple(state["transformer.h.1.attn.bias"].shape) == (1, 1, 64, 64)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert _model(ckpt).random_weights


def test_real_preset_matches_the_original_config() -> None:
    """train.py: GPT2Config(vocab_size=21150, n_embd=1024, n_layer=8, n_head=16) + GPT-2 defaults.
    The released pytorch_model.bin is 502 MB: fp32 parameters plus eight 1 MiB uint8 causal masks."""
    from transformers import GPT2LMHeadModel

    cfg = TgptModel.presets["1024-8-16-64"]
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["vocab_size"]) == (
        1024, 8, 16, 1024, 21150)
    with torch.device("meta"):  # shapes only
        module = GPT2LMHeadModel._from_config(gpt2_config(cfg))
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == 123_478_016
    size = 4 * n_params + cfg["n_layer"] * (cfg["n_positions"] ** 2 + 4)
    assert round(size / 1e6) == 502
    assert module.config.n_inner is None and module.config.activation_function == "gelu_new"


def test_real_preset_needs_the_real_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tokenizer_dir"):
        TgptModel.init_random(tmp_path / "real", "1024-8-16-64")
    with pytest.raises(UserError, match=r"lacks tokenizer\.json"):
        TgptModel.init_random(tmp_path / "bad", "tiny", {"tokenizer_dir": str(tmp_path)})


def test_strict_loading(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    good = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    with caplog.at_level(logging.INFO, logger="scdrugmap_ray.engine.models.checkpoint"):
        assert _model(ckpt).load() is not None
    # the released layout's tied LM head and legacy buffers: skipped and named in one log line (issue 15)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 5 tensor(s)" in lines[0]
    assert "lm_head.weight" in lines[0] and "transformer.h.*.attn.masked_bias (x2)" in lines[0]

    def variant(name: str, state: dict) -> Path:
        d = _copy_ckpt(ckpt, tmp_path / name)
        torch.save(state, d / "pytorch_model.bin")
        return d

    dropped = dict(good)
    del dropped["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(UserError, match=r"missing .*transformer\.h\.1\.mlp\.c_fc\.weight"):
        _model(variant("missing", dropped)).load()

    extra = {**good, "score.weight": torch.zeros(2, 64)}
    with pytest.raises(UserError, match=r"unexpected .*score\.weight"):
        _model(variant("extra", extra)).load()

    reshaped = {**good, "transformer.h.0.attn.c_attn.weight": torch.zeros(64, 96)}
    with pytest.raises(UserError, match=r"attn\.c_attn\.weight has shape \(64, 96\)"):
        _model(variant("shape", reshaped)).load()

    cut = _copy_ckpt(ckpt, tmp_path / "truncated")
    data = (cut / "pytorch_model.bin").read_bytes()
    (cut / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt checkpoint file"):
        _model(cut).load()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"expected config\.json, pytorch_model\.bin"):
        _model(empty).load()

    other = _copy_ckpt(ckpt, tmp_path / "bert")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(UserError, match="not 'gpt2'"):
        _model(other).load()

    foreign = _copy_ckpt(ckpt, tmp_path / "foreign")
    doc = json.loads((foreign / "tokenizer.json").read_text())
    doc["model"] = {"type": "BPE", "vocab": {}, "merges": []}
    (foreign / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="not a WordLevel tokenizer"):
        _model(foreign).load()


def test_safetensors_body_layout_loads_the_same(real: dict, ckpt: Path, tmp_path: Path) -> None:
    """GPT2Model keys (no 'transformer.' prefix, no LM head, no legacy buffers) in model.safetensors
    give the same embeddings as the official pytorch_model.bin."""
    from safetensors.torch import save_file

    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    body = {k.removeprefix("transformer."): v.contiguous() for k, v in state.items()
            if k.startswith("transformer.") and not re.search(r"\.attn\.(masked_)?bias$", k)}
    d = tmp_path / "st"
    d.mkdir()
    for f in ["config.json", *TOKENIZER_FILES]:
        (d / f).write_bytes((ckpt / f).read_bytes())
    save_file(body, str(d / "model.safetensors"))
    a, b = _model(ckpt), _model(d)
    cells = a.make_tokenizer(real["genes"])(*_cells(real, [0, 181]))["input_ids"]
    with torch.inference_mode():
        ea = a.embed(a.load(), a.collate({"input_ids": cells}))
        eb = b.embed(b.load(), b.collate({"input_ids": cells}))
    assert torch.equal(ea, eb)


def test_tiny_preset_stand_in_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real: dict) -> None:
    """Without the official tokenizer the tiny preset gets a stand-in with the same structure (over
    org.Hs.eg.db symbols) that the `tokenizers` library reads and encodes as this module does."""
    from tokenizers import Tokenizer

    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path))
    model = get_model("tgpt", {"preset": "tiny"})
    path = tmp_path / "checkpoints" / "tgpt-tiny-random"
    assert model.random_weights and model.max_length == 64 and model.embedding_dim == 64
    assert "stand-in" in json.loads((path / RANDOM_WEIGHTS_MARKER).read_text())["tokenizer"]
    tok = model.make_tokenizer(real["genes"])
    assert tok.coverage > 0.6  # org.Hs.eg.db lacks the RP11-... clone names of this annotation (0.648)
    ids, gi, vals = _cells(real, [0, 181])
    ours = tok(ids, gi, vals)["input_ids"]
    tk = Tokenizer.from_file(str(path / "tokenizer.json"))
    tk.enable_truncation(64)
    for g, v, t in zip(gi, vals, ours, strict=True):
        assert tk.encode(reference_sentence(real["symbols"], g, v)).ids == t.tolist()
    # LoRA targets: Conv1D modules that forward really calls
    module = model.load()
    hits: list[str] = []
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1] in model.lora_targets:
            assert type(sub).__name__ == "Conv1D"
            sub.register_forward_hook(lambda m, i, o, n=name: hits.append(n))
    with torch.inference_mode():
        model.embed(module, model.collate({"input_ids": ours}))
    assert len(set(hits)) == 2 * 3  # per layer: attn.c_attn, attn.c_proj, mlp.c_proj


def test_options() -> None:
    for bad in ({"exclude_genes": "mito"}, {"unknown_genes": "skip"}, {"max_len": 2}, {"min_coverage": 2}):
        with pytest.raises(UserError, match="tgpt option"):
            get_model("tgpt", {"preset": "tiny", **bad})
    with pytest.raises(UserError, match="no preset"):
        get_model("tgpt", {"preset": "huge"}).checkpoint_dir()


def test_max_len_beyond_positions(ckpt: Path) -> None:
    with pytest.raises(UserError, match="n_positions"):
        _ = _model(ckpt, max_len=65).max_length
