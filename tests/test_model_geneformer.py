"""Geneformer: rank value encoding on real cells (hand-checked values and an independent plain-Python
tokenizer), strict loading of the official checkpoint format, the embedding rule against transformers'
own hidden states, batch independence, presets against the official configs and the key manifest."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from realcells import cells as _cells
from safetensors.torch import load_file, save_file
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.geneformer import (
    DICTIONARY_FILES,
    RESOURCES,
    TIED_KEYS,
    GeneformerModel,
    bert_config,
    build_encoder,
    encoder_shapes,
)

#: rows of the real file used below: long cells (> 2,048 known genes), mid, short, and row 1686 whose only
#: expressed gene is outside the V1 vocabulary
ROWS = [0, 1, 2, 181, 208, 1209, 1212, 1333, 1686]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real(pc9: dict, shared_dir: Path) -> dict:
    return {**pc9}


def _dicts(version: str) -> dict:
    with gzip.open(RESOURCES / DICTIONARY_FILES[version], "rt") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gf")
    return {p: GeneformerModel.init_random(root / p, p) for p in ("tiny", "tiny-v2")}


def _model(path: Path, **options) -> GeneformerModel:
    return get_model("geneformer", {"checkpoint": str(path), **options})  # type: ignore[return-value]


# ------------------------------------------------------------------------------ an independent tokenizer


def reference_tokens(genes: pd.DataFrame, gi: np.ndarray, vals: np.ndarray, version: str, size: int) -> list[int]:
    """Geneformer's rank value encoding written out with plain dicts and sorted()."""
    d = _dicts(version)
    tokens, median, mapping, names = d["token_dictionary"], d["gene_median"], d["ensembl_mapping"], d["gene_name_id"]

    def resolve(eid: object, sym: str) -> str | None:
        if isinstance(eid, str) and eid:
            return mapping.get(eid.upper())
        return mapping.get(sym.upper()) or (mapping.get(names[sym].upper()) if sym in names else None)

    target = [resolve(e, s) for e, s in zip(genes["ensembl_id"], genes["symbol"], strict=True)]
    first_pos: dict[str, int] = {}
    n_hits: dict[str, int] = {}
    for pos, t in enumerate(target):
        if t is not None:
            first_pos.setdefault(t, pos)
            n_hits[t] = n_hits.get(t, 0) + 1
    total = sum(float(v) for v in vals)
    summed: dict[str, float] = {}
    for g, v in zip(gi.tolist(), vals.tolist(), strict=True):
        if target[g] is not None:
            summed[target[g]] = summed.get(target[g], 0.0) + v
    # genes shared by several store genes come after the unique ones (the original's collapsed layout)
    ranked = sorted(
        summed,
        key=lambda t: (-(summed[t] / total * 10_000 / median[t]), n_hits[t] > 1, first_pos[t]),
    )
    if version == "V2":
        return [tokens["<cls>"]] + [tokens[t] for t in ranked[: size - 2]] + [tokens["<eos>"]]
    return [tokens[t] for t in ranked[:size]]


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_hand_checked_first_cell(real: dict, ckpts: dict[str, Path]) -> None:
    """Cell CGTTAGCACGTT: 21,054 counts, 5,167 genes. Its top genes by count / 21054 * 10000 / median:
    HSP90AA1 188 / 21054 * 1e4 / 11.5932 = 7.702; CCT6A 42 -> 42 / 21054 * 1e4 / 2.9734 = 6.709;
    GSTP1 98 / .. / 9.1003 = 5.115; TXN 68 / .. / 6.6766 = 4.837; PRC1 22 / .. / 2.2167 = 4.714
    (V1 medians and token ids read from token_dictionary_gc30M / gene_median_dictionary_gc30M)."""
    ids, gi, vals = _cells(real, [0])
    assert float(vals[0].sum()) == 21054.0
    v1 = _model(ckpts["tiny"]).make_tokenizer(real["genes"])
    t1 = v1(ids, gi, vals)["input_ids"][0]
    assert t1.dtype == np.int32
    assert t1[:5].tolist() == [1513, 8831, 1626, 7295, 17305]
    assert len(t1) == 2048  # 4,518 of its genes are in the V1 vocabulary: truncated to the model input
    # V2 (gc104M medians: HSP90AA1 8.8699, CCT6A 2.3287, PRC1 1.2673, GSTP1 6.9180): HSP90AA1 10.067,
    # CCT6A 8.566, PRC1 22 / 21054 * 1e4 / 1.2673 = 8.245 now ahead of GSTP1 (6.728)
    v2 = _model(ckpts["tiny-v2"]).make_tokenizer(real["genes"])
    t2 = v2(ids, gi, vals)["input_ids"][0]
    assert t2[0] == 2 and t2[-1] == 3 and len(t2) == 4096  # <cls> ... <eos>, 4,094 genes
    assert t2[1:4].tolist() == [1505, 8753, 16925]  # HSP90AA1, CCT6A, PRC1


@pytest.mark.parametrize("preset,version,size", [("tiny", "V1", 2048), ("tiny-v2", "V2", 4096)])
def test_tokenizer_matches_plain_python(real: dict, ckpts: dict[str, Path], preset: str, version: str,
                                        size: int) -> None:
    tok = _model(ckpts[preset]).make_tokenizer(real["genes"])
    ids, gi, vals = _cells(real, ROWS)
    got = tok(ids, gi, vals)["input_ids"]
    for row, g, v, t in zip(ROWS, gi, vals, got, strict=True):
        assert t.tolist() == reference_tokens(real["genes"], g, v, version, size), f"row {row}"
    if version == "V1":
        assert len(got[-1]) == 0  # row 1686: no gene in the vocabulary


def test_tokenizer_is_per_cell(real: dict, ckpts: dict[str, Path]) -> None:
    tok = _model(ckpts["tiny"]).make_tokenizer(real["genes"])
    ids, gi, vals = _cells(real, ROWS)
    together = tok(ids, gi, vals)["input_ids"]
    for i in range(len(ROWS)):
        alone = tok(ids[i : i + 1], gi[i : i + 1], vals[i : i + 1])["input_ids"][0]
        assert np.array_equal(alone, together[i])
    # gene order within a cell does not matter
    perm = np.random.default_rng(0).permutation(len(gi[0]))
    shuffled = tok(ids[:1], [gi[0][perm]], [vals[0][perm]])["input_ids"][0]
    assert np.array_equal(shuffled, together[0])


def test_duplicates_summed_ties_in_store_order(ckpts: dict[str, Path]) -> None:
    """Hand-made genes: two store genes with HSP90AA1's Ensembl ID are summed; MIR588 and
    ENSG00000264844 share the V1 median 1.44843..., so equal counts tie and keep store order."""
    genes = pd.DataFrame(
        {
            "position": [0, 1, 2, 3, 4, 5],
            "symbol": ["HSP90AA1", "HSP90AA1-dup", "X264844", "MIR588", "CCT6A", "NOT_A_GENE"],
            "ensembl_id": ["ENSG00000080824", "ENSG00000080824.5", "ENSG00000264844", "ENSG00000207632", None, None],
        }
    )
    model = _model(ckpts["tiny"], min_coverage=0.0)
    tok = model.make_tokenizer(genes)
    assert tok.report["via_ensembl_id"] == 4 and tok.report["via_symbol"] == 1  # CCT6A by symbol
    assert tok.report["n_summed_tokens"] == 1 and tok.coverage == pytest.approx(5 / 6)
    counts = np.array([3, 2, 1, 1, 4, 7], dtype=np.float32)  # total 18, all genes (NOT_A_GENE included)
    out = tok(np.array(["c"]), [np.arange(6, dtype=np.int32)], [counts])["input_ids"][0]
    # HSP90AA1 (3+2)/18*1e4/11.5932 = 239.6; CCT6A 4/18*1e4/2.9734 = 747.4; the tied pair 1/18*1e4/1.4484
    # = 383.5 each, ENSG00000264844 (position 2) before MIR588 (position 3)
    assert out.tolist() == [8831, 22219, 18121, 1513]


def test_coverage_report_and_refusal(real: dict, ckpts: dict[str, Path]) -> None:
    model = _model(ckpts["tiny"])
    report = model.vocabulary_coverage(real["genes"])
    assert report["n_store_genes"] == 21207
    assert 0.5 < report["coverage"] < 0.7  # protein-coding/miRNA vocabulary vs a full Drop-seq gene list
    assert report["via_ensembl_id"] + report["via_symbol"] == report["n_in_vocabulary"]
    mouse = pd.DataFrame(
        {"position": [0, 1, 2], "symbol": ["Actb", "Gapdh", "Xist"],
         "ensembl_id": ["ENSMUSG00000029580", "ENSMUSG00000057666", "ENSMUSG00000086503"]}
    )
    with pytest.raises(UserError, match="vocabulary"):
        model.make_tokenizer(mouse)
    assert model.vocabulary_coverage(mouse)["coverage"] == 0.0


# ------------------------------------------------------------------------------------------ embedding


def _tokens(real: dict, model: GeneformerModel, rows: list[int]) -> list[np.ndarray]:
    return model.make_tokenizer(real["genes"])(*_cells(real, rows))["input_ids"]


@pytest.mark.parametrize("preset,emb_layer", [("tiny", -1), ("tiny", 0), ("tiny-v2", -1)])
def test_embedding_rule_against_hidden_states(real: dict, ckpts: dict[str, Path], preset: str,
                                              emb_layer: int) -> None:
    """Mean over genes of hidden_states[n_layers + emb_layer] of the full BertForMaskedLM forward, one
    cell at a time (no padding), as EmbExtractor; V2 excludes <cls> and <eos>."""
    model = _model(ckpts[preset], emb_layer=emb_layer, pooling="mean")
    module = model.load()
    cells = _tokens(real, model, [1209, 181, 1212])
    with torch.inference_mode():
        got = model.embed(module, model.collate({"input_ids": cells}))
        for i, c in enumerate(cells):
            ids = torch.as_tensor(c, dtype=torch.long)[None]
            hs = module(input_ids=ids, output_hidden_states=True).hidden_states[2 + emb_layer]
            want = hs[0, 1:-1].mean(0) if preset == "tiny-v2" else hs[0].mean(0)
            assert torch.allclose(got[i], want, atol=1e-5)
    assert got.shape == (3, 64) and got.dtype == torch.float32


def test_cls_pooling_v2_and_refused_for_v1(real: dict, ckpts: dict[str, Path]) -> None:
    # the default pooling "auto" is EmbExtractor's: emb_mode "cls" for V2, "cell" (mean) for V1 (issue 15;
    # before it the default was mean for both); the run manifest records what auto meant
    assert _model(ckpts["tiny-v2"]).pooling == "cls" and _model(ckpts["tiny"]).pooling == "mean"
    assert _model(ckpts["tiny-v2"]).identity()["resolved"] == {"pooling": "cls", "version": "V2"}
    model = _model(ckpts["tiny-v2"], pooling="cls")
    module = model.load()
    cells = _tokens(real, model, [1209, 1212])
    with torch.inference_mode():
        got = model.embed(module, model.collate({"input_ids": cells}))
        ids = torch.as_tensor(cells[0], dtype=torch.long)[None]
        want = module(input_ids=ids, output_hidden_states=True).hidden_states[1][0, 0]
    assert torch.allclose(got[0], want, atol=1e-5)
    with pytest.raises(UserError, match="V2"):
        _ = _model(ckpts["tiny"], pooling="cls").version


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2"])
def test_batch_independence(real: dict, ckpts: dict[str, Path], preset: str) -> None:
    model = _model(ckpts[preset])
    module = model.load()
    cells = _tokens(real, model, ROWS[3:])  # 6 cells of different lengths, one empty for V1
    with torch.inference_mode():
        batch = model.embed(module, model.collate({"input_ids": cells}))
        padded = model.embed(module, model.collate({"input_ids": cells[::-1]}, pad_to=model.max_length))
        for i, c in enumerate(cells):
            alone = model.embed(module, model.collate({"input_ids": [c]}))
            assert torch.allclose(alone[0], batch[i], atol=1e-5)
            assert torch.allclose(alone[0], padded[len(cells) - 1 - i], atol=1e-5)
    assert torch.isfinite(batch).all()
    if preset == "tiny":
        assert torch.equal(batch[-1], torch.zeros(64))  # no gene in the vocabulary: zeros, not NaN


def test_collate_pads_to_longest(ckpts: dict[str, Path]) -> None:
    model = _model(ckpts["tiny"])
    rows = {"input_ids": [np.array([5, 6, 7], dtype=np.int32), np.array([9], dtype=np.int32)]}
    b = model.collate(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["lengths"].tolist() == [3, 1]
    assert model.collate(rows, pad_to=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError):
        model.collate(rows, pad_to=2)


# ---------------------------------------------------------------------------------------- checkpoints


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_init_random_official_files_and_keys(ckpts: dict[str, Path], shared_dir: Path) -> None:
    path = ckpts["tiny"]
    assert sorted(p.name for p in path.iterdir()) == ["RANDOM_WEIGHTS.json", "config.json", "model.safetensors"]
    marker = json.loads((path / RANDOM_WEIGHTS_MARKER).read_text())
    assert marker["model"] == "geneformer" and marker["preset"] == "tiny"
    state = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == 25426 and cfg["num_hidden_layers"] == 2 and cfg["architectures"] == ["BertForMaskedLM"]
    # the manifest's V1 keys for layers 0-1, minus the tied decoder (save_pretrained drops it)
    manifest = json.loads((shared_dir / "assets/manifests/geneformer.json").read_text())
    official = manifest["variants"]["Geneformer-V1-10M"]["state_dict"]
    want = {k for k in official if not k.startswith(tuple(f"bert.encoder.layer.{i}." for i in range(2, 6)))}
    assert set(state) == want - set(TIED_KEYS)
    assert tuple(state["bert.embeddings.word_embeddings.weight"].shape) == (25426, 64)
    assert _model(path).random_weights


@pytest.mark.parametrize("preset,variant,config_file", [
    ("v1-10m", "Geneformer-V1-10M", "Geneformer-V1-10M.config.json"),
    ("v2-104m", "Geneformer-V2-104M", "Geneformer-V2-104M.config.json"),
])
def test_real_presets_match_official(shared_dir: Path, preset: str, variant: str, config_file: str) -> None:
    from transformers import BertForMaskedLM

    official = json.loads((shared_dir / "assets/geneformer/configs" / config_file).read_text())
    assert GeneformerModel.presets[preset] == official
    with torch.device("meta"):  # shapes only, no weights allocated
        module = BertForMaskedLM(bert_config(official))
    manifest = json.loads((shared_dir / "assets/manifests/geneformer.json").read_text())
    want = {k: tuple(v) for k, v in manifest["variants"][variant]["state_dict"].items()}
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == want
    # what the loader requires: the manifest's bert.* keys; the rest (the MLM head) is skipped
    with torch.device("meta"):
        enc = encoder_shapes(build_encoder(official))
    assert enc == {k: v for k, v in want.items() if k.startswith("bert.")}


def test_strict_loading(ckpts: dict[str, Path], tmp_path: Path) -> None:
    src = ckpts["tiny"]
    good = load_file(str(src / "model.safetensors"))
    assert _model(src).load() is not None

    def variant(name: str, state: dict) -> Path:
        d = _copy_ckpt(src, tmp_path / name)
        save_file(state, str(d / "model.safetensors"))
        return d

    dropped = dict(good)
    del dropped["bert.encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(UserError, match=r"missing .*bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        _model(variant("missing", dropped)).load()

    extra = {**good, "bert.encoder.layer.7.output.dense.weight": torch.zeros(64, 64)}  # a layer config.json lacks
    with pytest.raises(UserError, match=r"unexpected .*bert\.encoder\.layer\.7\.output\.dense\.weight"):
        _model(variant("extra", extra)).load()

    reshaped = {**good, "bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(96, 64)}
    with pytest.raises(UserError, match=r"intermediate\.dense\.weight has shape \(96, 64\)"):
        _model(variant("shape", reshaped)).load()

    cut = _copy_ckpt(src, tmp_path / "truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt checkpoint file"):
        _model(cut).load()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"expected config\.json and model\.safetensors"):
        _model(empty).load()

    other = _copy_ckpt(src, tmp_path / "gpt")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="not 'bert'"):
        _model(other).load()


def test_torch_bin_with_tied_keys_and_legacy_buffer(real: dict, ckpts: dict[str, Path], tmp_path: Path) -> None:
    """An old-style pytorch_model.bin (torch.save of the full state dict: tied decoder included, the
    position_ids buffer of transformers 4.6) loads to the same model as the safetensors file."""
    src = ckpts["tiny"]
    state = load_file(str(src / "model.safetensors"))
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    state["bert.embeddings.position_ids"] = torch.arange(2048)[None]
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_bytes((src / "config.json").read_bytes())
    torch.save(state, d / "pytorch_model.bin")
    a, b = _model(src), _model(d)
    cells = _tokens(real, a, [181, 1209])
    with torch.inference_mode():
        ea = a.embed(a.load(), a.collate({"input_ids": cells}))
        eb = b.embed(b.load(), b.collate({"input_ids": cells}))
    assert torch.equal(ea, eb)


def test_preset_through_cache_and_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          ckpts: dict[str, Path]) -> None:
    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path))
    model = get_model("geneformer", {"preset": "tiny-v2"})
    assert model.random_weights and model.version == "V2" and model.max_length == 4096
    assert (tmp_path / "checkpoints" / "geneformer-tiny-v2-random" / "model.safetensors").is_file()
    assert model.lora_targets == ["query", "key", "value"]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.load().named_modules()}
    assert set(model.lora_targets) <= names
    with pytest.raises(UserError, match="pooling"):
        get_model("geneformer", {"preset": "tiny", "pooling": "max"})
    with pytest.raises(UserError, match="emb_layer"):
        _ = _model(ckpts["tiny"], emb_layer=-3).layer_index
    with pytest.raises(UserError, match="no preset"):
        get_model("geneformer", {"preset": "huge"}).checkpoint_dir()
    assert _model(ckpts["tiny"], version="v2").options["version"] == "V2"


def test_classifier_checkpoint_loads_and_skips_heads(real: dict, ckpts: dict[str, Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A fine-tuned BertForSequenceClassification file (EmbExtractor's "CellClassifier" models: bert.* +
    pooler + classifier, no MLM head) embeds like the pretrained file it came from; the released MLM head
    is skipped and named in one log line."""
    import logging

    src = ckpts["tiny"]
    state = load_file(str(src / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="scdrugmap_ray.engine.models.checkpoint"):
        a = _model(src)
        module = a.load()
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "cls.predictions.transform.dense.weight" in lines[0]
    clf = {k: v for k, v in state.items() if k.startswith("bert.")}
    clf |= {"bert.pooler.dense.weight": torch.zeros(64, 64), "bert.pooler.dense.bias": torch.zeros(64),
            "classifier.weight": torch.zeros(3, 64), "classifier.bias": torch.zeros(3)}
    d = _copy_ckpt(src, tmp_path / "classifier")
    save_file(clf, str(d / "model.safetensors"))
    b = _model(d)
    cells = _tokens(real, a, [181, 1209])
    with torch.inference_mode():
        want = a.embed(module, a.collate({"input_ids": cells}))
        assert torch.equal(b.embed(b.load(), b.collate({"input_ids": cells})), want)


# ------------------------------------------------------------------------------------------- upstream parity


def _upstream_transcriptome_tokenizer() -> type:
    """``TranscriptomeTokenizer`` as published in the ``helical`` 2.2.0 wheel
    (``helical/models/geneformer/geneformer_tokenizer.py``: a copy of ctheodoris/Geneformer's
    ``geneformer/tokenizer.py``), run from its own source. The module's imports (``datasets``, ``scanpy``)
    cannot be installed beside torch 2.13 here, and ``geneformer`` itself is not on PyPI, so only
    ``rank_genes``, ``tokenize_cell``, ``sum_ensembl_ids`` and the class are executed, with ``anndata`` standing
    in for ``scanpy`` (``sum_ensembl_ids`` calls only ``sc.AnnData`` and ``sc.concat``, which are anndata's).
    Install: ``pip install --no-deps helical==2.2.0``."""
    import ast
    import importlib.metadata
    import importlib.util
    import logging
    import pickle
    from collections import Counter

    import anndata
    import scipy.sparse as sp
    from anndata._core.views import ArrayView

    spec = importlib.util.find_spec("helical")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("helical 2.2.0 is not installed: pip install --no-deps helical==2.2.0 "
                    "(tools/install.sh --dev, i.e. make install, does it)")
    assert importlib.metadata.version("helical") == "2.2.0"
    src = Path(next(iter(spec.submodule_search_locations))) / "models/geneformer/geneformer_tokenizer.py"
    names = {"rank_genes", "tokenize_cell", "sum_ensembl_ids", "TranscriptomeTokenizer"}
    tree = ast.parse(src.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]
    assert {n.name for n in body} == names
    ns = {"np": np, "sp": sp, "pd": pd, "pickle": pickle, "Counter": Counter, "sc": anndata, "ArrayView": ArrayView,
          "LOGGER": logging.getLogger("geneformer"), "tqdm": lambda x: x, "Path": Path,
          "DEFAULT_GENE_MEDIAN_FILE": None, "DEFAULT_TOKEN_DICTIONARY_FILE": None, "DEFAULT_ENSEMBL_MAPPING_FILE": None}
    from typing import Literal

    ns["Literal"] = Literal
    exec(compile(ast.Module(body=body, type_ignores=[]), str(src), "exec"), ns)
    return ns["TranscriptomeTokenizer"]


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_tokenizer_parity_with_upstream_transcriptome_tokenizer(real: dict, ckpts: dict[str, Path],
                                                                shared_dir: Path, version: str) -> None:
    """Real GSE149383 cells through the published ``TranscriptomeTokenizer.tokenize_anndata`` (official
    gc30M / gc104M pickles, ``n_counts`` = the cell's total, ``var["ensembl_id"]`` = the store's IDs) and
    ``create_dataset``'s truncation and special tokens (V1: 2,048, none; V2: 4,096 with <cls>/<eos>): the
    same token ids as this package's tokenizer, cell by cell (genes without an Ensembl ID in the store are
    left out on both sides: this package names them by symbol, upstream cannot). Upstream ranks with numpy's
    unstable argsort; ties do not occur among these cells' float64 values, so the orders must be equal."""
    import anndata
    import scipy.sparse as sp

    rows = [0, 1, 2, 181, 208, 1209, 1212, 1333]  # long (> 2,048 known genes), mid and short cells
    ids, gi, vals = _cells(real, rows)
    genes = real["genes"].copy()
    known = genes["ensembl_id"].notna().to_numpy()
    genes.loc[~known, "symbol"] = None  # nameless for this package too
    model = _model(ckpts["tiny" if version == "V1" else "tiny-v2"], min_coverage=0.0)
    ours = model.make_tokenizer(genes)(ids, gi, vals)["input_ids"]

    x = real["X"][rows].astype(np.float64)
    folder = shared_dir / "assets/geneformer" / ("v1_gc30M" if version == "V1" else "v2_gc104M")
    tag = "gc30M" if version == "V1" else "gc104M"
    tk = _upstream_transcriptome_tokenizer()(
        model_input_size=2048 if version == "V1" else 4096, special_token=version == "V2",
        gene_median_file=folder / f"gene_median_dictionary_{tag}.pkl",
        token_dictionary_file=folder / f"token_dictionary_{tag}.pkl",
        gene_mapping_file=folder / f"ensembl_mapping_dict_{tag}.pkl")
    # The original's sum_ensembl_ids maps var["ensembl_id"] through the mapping dictionary and sums the
    # columns that land on one ID (here two store genes -> MCL1 for V2); its tokenize_anndata then reads
    # var["ensembl_id_collapsed"] (ctheodoris/Geneformer geneformer/tokenizer.py). helical 2.2.0's copy reads
    # var["ensembl_id"] there instead, which drops remapped and collapsed genes, so the test hands it the
    # mapped, summed columns the original would build: everything after that step is helical's code.
    mapped = genes.loc[known, "ensembl_id"].str.upper().map(tk.gene_mapping_dict)
    cols = pd.Series(np.flatnonzero(known))[mapped.notna().to_numpy()]
    target = mapped.dropna().to_numpy()
    uniq, inverse = np.unique(target, return_inverse=True)
    summing = sp.csr_matrix((np.ones(len(cols)), (cols.to_numpy(), inverse)), shape=(x.shape[1], len(uniq)))
    # float64 counts and totals: this package normalises in float64; upstream computes in the input's dtype,
    # and with float32 input genes whose normalised values agree to ~1e-7 (e.g. COX6B1 19 / median 5.8832
    # vs TSR3 6 / median 1.8579 in the first cell) can swap places
    adata = anndata.AnnData(X=(x @ summing).tocsr(),
                            obs=pd.DataFrame({"n_counts": np.asarray(x.sum(axis=1)).ravel()}, index=ids),
                            var=pd.DataFrame({"ensembl_id": uniq}, index=uniq))
    ranked, _ = tk.tokenize_anndata(adata)
    for i, cell in enumerate(ranked):
        if tk.special_token:  # create_dataset: crop with room for <cls> and <eos>
            want = [tk.gene_token_dict["<cls>"], *cell[: tk.model_input_size - 2], tk.gene_token_dict["<eos>"]]
        else:
            want = list(cell[: tk.model_input_size])
        assert ours[i].tolist() == [int(t) for t in want], f"cell {ids[i]}"
