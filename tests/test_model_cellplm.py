"""CellPLM: tokenizer on real cells (hand-checked), the vendored official config, init_random's container
against the reference ``cellplm`` package's model, strict loading, and the embeddings against the
reference package itself (its ``load_pretrain`` + ``CellEmbeddingPipeline`` on the same random-weight
checkpoint and the same real cells), batch independence, LoRA targets."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import pathlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from realcells import cells as _cells
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.cellplm import (
    OFFICIAL_CONFIG_FILE,
    CellPLMEncoder,
    CellPLMModel,
    decoder_shapes,
    official_gene_list,
    official_shapes,
    sinusoidal_2d_table,
    validate_config,
)
from torch import nn

CONFIG_JSON = "assets/cellplm/20230926_85M.config.json"
PREFIX = "cellplm_tiny"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return CellPLMModel.init_random(tmp_path_factory.mktemp("cellplm") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[CellPLMModel, CellPLMEncoder]:
    model = get_model("cellplm", {"checkpoint": str(tiny_dir)})
    assert isinstance(model, CellPLMModel)
    return model, model.load()


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt / f"{PREFIX}.best.ckpt", weights_only=True)


def _rewrite(src: Path, dst: Path, edit=None, edit_config=None) -> Path:  # type: ignore[no-untyped-def]
    dst.mkdir(parents=True, exist_ok=True)
    obj = _state(src)
    cfg = json.loads((src / f"{PREFIX}.config.json").read_text())
    if edit:
        edit(obj)
    if edit_config:
        edit_config(cfg)
    torch.save(obj, dst / f"{PREFIX}.best.ckpt")
    (dst / f"{PREFIX}.config.json").write_text(json.dumps(cfg))
    return dst


def _load_error(ckpt: Path, **options: str) -> str:
    model = get_model("cellplm", {"checkpoint": str(ckpt), **options})
    with pytest.raises(UserError) as err:
        model.load()  # type: ignore[attr-defined]
    return str(err.value)


# ------------------------------------------------------------------------------------------- config


def test_vendored_config_is_the_official_file(shared_dir: Path) -> None:
    with gzip.open(OFFICIAL_CONFIG_FILE, "rb") as fh:
        vendored = fh.read()
    official = (shared_dir / CONFIG_JSON).read_bytes()
    assert hashlib.sha256(vendored).hexdigest() == hashlib.sha256(official).hexdigest()
    cfg = json.loads(official)
    genes = cfg.pop("gene_list")
    assert CellPLMModel.presets["85m"] == cfg
    assert official_gene_list() == genes and len(genes) == 19_374 and genes[0] == "ENSG00000000003"


def test_unsupported_configs_are_user_errors() -> None:
    base = {**CellPLMModel.presets["tiny"], "gene_list": ["ENSG1", "ENSG2"]}
    validate_config(base)
    for change, word in (
        ({"enc_mod": "transformer"}, "enc_mod"),
        ({"latent_mod": "vae"}, "latent_mod"),
        ({"cat_pe": True}, "cat_pe"),
        ({"input_covariate": True}, "input_covariate"),
        ({"norm": "batchnorm"}, "norm"),
        ({"enc_hid": 30}, "enc_hid"),
        ({"gene_list": ["A", "A"]}, "duplicate"),
        ({"gene_list": []}, "gene_list"),
    ):
        with pytest.raises(UserError, match=word):
            validate_config({**base, **change})


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_real_cell_hand_checked(pc9: dict, tiny: tuple) -> None:
    model, _ = tiny
    tok = model.make_tokenizer(pc9["genes"])
    # 13,742 of the 21,207 store symbols have an Ensembl ID (org.Hs.eg.db); 12,150 of those are in the list
    assert tok.n_matched == 12_150 and tok.n_repeated == 1  # one ID carried by two store genes
    assert tok.coverage == pytest.approx(12_150 / 21_207)
    ids, gi, vals = _cells(pc9, [0])
    out = tok(ids, gi, vals)
    got_ids, got_vals = out["input_ids"][0], out["values"][0]
    assert got_ids.dtype == np.int32 and got_vals.dtype == np.float32
    # hand-checked on cell CGTTAGCACGTT: 5,167 expressed genes / 21,054 counts in the file; 4,516 genes /
    # 18,278 counts reach the model, as log1p of the raw counts (no library-size normalisation)
    assert ids[0] == "CGTTAGCACGTT" and len(got_ids) == 4_516
    assert got_ids[:3].tolist() == [2, 7, 8]  # ENSG00000000419 DPM1 (4 counts), FUCA2 (4), GCLC (3)
    np.testing.assert_allclose(got_vals[:3], np.log1p([4.0, 4.0, 3.0]), rtol=1e-7)
    assert np.expm1(got_vals.astype(np.float64)).sum() == pytest.approx(18_278, abs=0.01)

    # the same cell by an independent plain computation over the genes table
    gene_list = official_gene_list()
    pos = {g: i for i, g in enumerate(gene_list)}
    genes = pc9["genes"]
    ens = dict(zip(genes["position"], genes["ensembl_id"], strict=True))
    expected = sorted(
        (pos[ens[j]], math.log1p(float(c)))
        for j, c in zip(gi[0], vals[0], strict=True)
        if isinstance(ens[j], str) and ens[j] in pos and genes["symbol"][j] != "ADAMTSL4-AS1"
    )
    assert got_ids.tolist() == [p for p, _ in expected]
    np.testing.assert_allclose(got_vals, [v for _, v in expected], rtol=1e-6)

    # ADAMTSL4-AS1 and MCL1 share ENSG00000143384 in the store (a symbol -> Ensembl quirk): MCL1 counts
    sym = genes["symbol"].tolist()
    mcl1, antisense = sym.index("MCL1"), sym.index("ADAMTSL4-AS1")
    assert tok.lookup[mcl1] == pos["ENSG00000143384"] and tok.lookup[antisense] == -1


def test_tokenizer_versions_duplicates_and_low_coverage() -> None:
    genes = pd.DataFrame(
        {
            "position": np.arange(5, dtype=np.int32),
            "symbol": ["TSPAN6", "X1", "TNMD", "X2", "DPM1"],
            "ensembl_id": ["ENSG00000000003.15", None, "ENSG00000000005", "ENSG00000000005", "ENSG00000000419"],
        }
    )
    tok = get_model("cellplm", {"preset": "tiny"}).make_tokenizer(genes)  # type: ignore[attr-defined]
    assert tok.lookup.tolist() == [0, -1, 1, -1, 2]  # version suffix dropped; TNMD's own symbol wins
    out = tok(np.array(["c"]), [np.array([4, 0, 3, 1], dtype=np.int32)], [np.array([3, 1, 9, 5], dtype=np.float32)])
    assert out["input_ids"][0].tolist() == [0, 2]
    np.testing.assert_allclose(out["values"][0], np.log1p([1.0, 3.0]), rtol=1e-7)
    empty = tok(np.array(["e"]), [np.array([1], dtype=np.int32)], [np.array([2.0], dtype=np.float32)])
    assert empty["input_ids"][0].size == 0

    symbols_only = genes.assign(ensembl_id=None)
    with pytest.raises(UserError, match="Ensembl"):
        get_model("cellplm", {"preset": "tiny"}).make_tokenizer(symbols_only)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- checkpoint


def test_init_random_is_what_the_reference_package_builds(tiny_dir: Path) -> None:
    om = pytest.importorskip("CellPLM.model")
    pe = pytest.importorskip("CellPLM.utils.pe")
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted([f"{PREFIX}.best.ckpt", f"{PREFIX}.config.json", RANDOM_WEIGHTS_MARKER])
    marker = json.loads((tiny_dir / RANDOM_WEIGHTS_MARKER).read_text())
    assert marker == {"model": "cellplm", "preset": "tiny", "note": "random weights, not pretrained"}
    cfg = json.loads((tiny_dir / f"{PREFIX}.config.json").read_text())
    obj = _state(tiny_dir)
    assert list(obj) == ["model_state_dict"]
    state = obj["model_state_dict"]
    with torch.device("meta"):
        full = om.OmicsFormer(**cfg)  # the pretraining model, decoder included
    assert list(state) == list(full.state_dict())
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in full.state_dict().items()}
    # the fixed positional table is the original's
    ref_pe = pe.Sinusoidal2dPE(cfg["enc_hid"])
    assert torch.equal(state["embedder.pe_enc.pe_enc.weight"], ref_pe.pe_enc.weight)
    torch.testing.assert_close(sinusoidal_2d_table(1024), pe.Sinusoidal2dPE(1024).pe_enc.weight, atol=0, rtol=0)


def test_85m_preset_shapes_match_the_reference(shared_dir: Path) -> None:
    om = pytest.importorskip("CellPLM.model")
    cfg = json.loads((shared_dir / CONFIG_JSON).read_text())
    with torch.device("meta"):
        ref = om.OmicsFormer(**{**cfg, "head_type": "embedder"})
        full = om.OmicsFormer(**cfg)
        ours = CellPLMEncoder(validate_config(cfg))
    vcfg = validate_config(cfg)
    shapes = official_shapes(vcfg)
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert list(shapes) == list(ref.state_dict())
    decoder = {k: tuple(v.shape) for k, v in full.state_dict().items() if k.startswith("decoder.")}
    assert decoder_shapes(vcfg) == decoder
    assert sum(math.prod(s) for s in {**shapes, **decoder}.values()) == 82_402_543
    # our module holds exactly the official keys the embedding uses
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine.items() <= shapes.items()
    dropped = sorted(set(shapes) - set(mine))
    assert all(k.startswith(("embedder.norm0.", "embedder.pe_enc.", "latent.layers.1.inference.")) for k in dropped)
    model = CellPLMModel(preset="85m")
    assert model.presets["85m"]["post_latent_dim"] == 512


def test_strict_loading(tiny_dir: Path, tmp_path: Path) -> None:
    assert not get_model("cellplm", {"checkpoint": str(tiny_dir)}).load().training  # type: ignore[attr-defined]

    key = "encoder.layers.1._ff_block.3.weight"
    msg = _load_error(_rewrite(tiny_dir, tmp_path / "missing", lambda o: o["model_state_dict"].pop(key)))
    assert "missing keys" in msg and key in msg

    unused = "embedder.pe_enc.missing_pe"  # never used by the embedding: skipped when there, optional (issue 15)
    get_model("cellplm", {"checkpoint": str(_rewrite(tiny_dir, tmp_path / "m2",
                                                     lambda o: o["model_state_dict"].pop(unused)))}).load()  # type: ignore[attr-defined]

    def add(o: dict) -> None:
        o["model_state_dict"]["encoder.extra.weight"] = torch.zeros(3)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "extra", add))
    assert "unexpected keys" in msg and "encoder.extra.weight" in msg

    def reshape(o: dict) -> None:
        o["model_state_dict"]["embedder.feat_enc.emb"] = torch.zeros(19_374, 33)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "shape", reshape))
    assert "embedder.feat_enc.emb" in msg and "(19374, 33)" in msg

    def depth(cfg: dict) -> None:
        cfg["enc_layers"] = 3

    assert "encoder.layers.2." in _load_error(_rewrite(tiny_dir, tmp_path / "depth", edit_config=depth))

    def fewer_genes(cfg: dict) -> None:
        cfg["gene_list"] = cfg["gene_list"][:100]

    assert "embedder.feat_enc.emb" in _load_error(_rewrite(tiny_dir, tmp_path / "genes", edit_config=fewer_genes))

    # the pretraining decoder is optional (the original drops it for embeddings too)
    def no_decoder(o: dict) -> None:
        o["model_state_dict"] = {k: v for k, v in o["model_state_dict"].items() if not k.startswith("decoder.")}

    get_model("cellplm", {"checkpoint": str(_rewrite(tiny_dir, tmp_path / "nodec", no_decoder))}).load()  # type: ignore[attr-defined]

    def bare(o: dict) -> None:
        state = o.pop("model_state_dict")
        o.update(state)

    assert "model_state_dict" in _load_error(_rewrite(tiny_dir, tmp_path / "bare", bare))


def test_checkpoint_directory_errors(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / f"{PREFIX}.best.ckpt").read_bytes()
    bad = _rewrite(tiny_dir, tmp_path / "trunc")
    (bad / f"{PREFIX}.best.ckpt").write_bytes(data[:1000])
    assert "truncated or corrupt checkpoint file" in _load_error(bad)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    msg = _load_error(empty)
    assert ".best.ckpt" in msg and "config.json" in msg

    two = _rewrite(tiny_dir, tmp_path / "two")
    (two / "other.config.json").write_text((two / f"{PREFIX}.config.json").read_text())
    (two / "other.best.ckpt").write_bytes(data)
    assert "several" in _load_error(two)
    get_model("cellplm", {"checkpoint": str(two), "prefix": "other"}).load()  # type: ignore[attr-defined]
    assert "option 'prefix'" in _load_error(two, prefix="nope")

    unsafe = _rewrite(tiny_dir, tmp_path / "unsafe", lambda o: o.update(path=pathlib.PurePosixPath("x")))
    assert "cannot be loaded safely" in _load_error(unsafe)

    bad_json = _rewrite(tiny_dir, tmp_path / "json")
    (bad_json / f"{PREFIX}.config.json").write_text("{not json")
    assert "JSON" in _load_error(bad_json)


# ------------------------------------------------------------------------------------------- embedding


def _reference_embeddings(
    tiny_dir: Path, pc9: dict, tok: object, rows: list[int], batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> np.ndarray:
    """The reference package's CellEmbeddingPipeline on the same cells (var names = the Ensembl IDs our
    tokenizer matched; everything else stays in and is filtered by the original itself)."""
    pytest.importorskip("scanpy")
    autoencoders = pytest.importorskip("CellPLM.latent.autoencoders")
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline

    # the original samples the GMVAE cluster (Gumbel noise); with zero noise it takes the mode, as ours
    def no_noise(self: object, logits: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
        return torch.zeros_like(logits)

    monkeypatch.setattr(autoencoders.GumbelSoftmax, "sample_gumbel", no_noise)
    gene_list = official_gene_list()
    lookup = tok.lookup  # type: ignore[attr-defined]
    names = [gene_list[i] if i >= 0 else f"unmatched_{j}" for j, i in enumerate(lookup)]
    adata = pc9["adata"][rows].copy()
    adata.var_names = names
    pipe = CellEmbeddingPipeline(pretrain_prefix=PREFIX, pretrain_directory=str(tiny_dir))
    with pytest.warns(UserWarning):  # no obs['batch']: all cells are one sample
        out = pipe.predict(adata, inference_config={"batch_size": batch_size}, ensembl_auto_conversion=False)
    return out.numpy()


def test_embeddings_equal_the_reference_package(
    pc9: dict, tiny: tuple, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, module = tiny
    tok = model.make_tokenizer(pc9["genes"])
    rows = [0, 3, 40, 41, 7]
    out = tok(*_cells(pc9, rows))
    batch = model.collate(out)
    with torch.inference_mode():
        ours = model.embed(module, batch)
        joint = module(batch["input_ids"], batch["values"], joint=True)
    assert ours.shape == (5, 16) and ours.dtype == torch.float32
    # the original one cell per pass (batch_size 1) is what we compute
    ref_single = _reference_embeddings(tiny_dir, pc9, tok, rows, 1, monkeypatch)
    np.testing.assert_allclose(ours.numpy(), ref_single, atol=1e-5, rtol=1e-4)
    # the original's default (all cells of a sample attend to each other) equals our joint mode, and differs;
    # 5 cells > head dim 4, so this runs the linear-attention order q (k^T v), one-cell sequences the other
    ref_joint = _reference_embeddings(tiny_dir, pc9, tok, rows, 0, monkeypatch)
    np.testing.assert_allclose(joint.numpy(), ref_joint, atol=1e-5, rtol=1e-4)
    assert np.abs(ref_joint - ref_single).max() > 1e-3


def test_batch_independence_and_empty_cells(pc9: dict, tiny: tuple) -> None:
    model, module = tiny
    out = model.make_tokenizer(pc9["genes"])(*_cells(pc9, [0, 3, 40, 41]))
    assert len({len(x) for x in out["input_ids"]}) == 4
    with torch.inference_mode():
        batch = model.embed(module, model.collate(out))
        alone = model.embed(module, model.collate({k: v[2:3] for k, v in out.items()}))
        padded = model.embed(module, model.collate({k: v[2:3] for k, v in out.items()}, pad_to=model.max_length))
        with_empty = model.embed(module, model.collate({k: [*v, v[0][:0]] for k, v in out.items()}))
    np.testing.assert_allclose(alone[0].numpy(), batch[2].numpy(), atol=1e-5)
    np.testing.assert_allclose(padded[0].numpy(), batch[2].numpy(), atol=1e-5)
    assert torch.isfinite(with_empty).all()
    torch.testing.assert_close(with_empty[:4], batch, atol=1e-5, rtol=0)


def test_lora_targets_reach_the_embedding_and_checkpoint_the_encoder(tiny: tuple) -> None:
    """Every target reaches the embedding (the trainer's own check), and the layer stack that gradient
    checkpointing takes (the longest nn.ModuleList) is the encoder's. (That the targets are linear layers
    called in forward is tests/test_model_contract.py's.)"""
    from scdrugmap_ray.engine.train.lora import enable_gradient_checkpointing, resolve_targets

    model, module = tiny
    targets = [n for n, _ in module.named_modules() if any(n.endswith(t) for t in model.lora_targets)]
    rows = {"input_ids": [np.array([1, 5], dtype=np.int32)], "values": [np.array([1.0, 2.0], dtype=np.float32)]}
    fresh = model.load()
    assert sorted(resolve_targets(model, fresh, None, rows)) == sorted(targets)
    assert max((m for m in fresh.modules() if isinstance(m, nn.ModuleList)), key=len) is fresh.encoder.layers
    assert enable_gradient_checkpointing(fresh) == 2


def test_bf16_module(tiny: tuple, pc9: dict) -> None:
    model, module = tiny
    half = model.load(dtype=torch.bfloat16)
    out = model.make_tokenizer(pc9["genes"])(*_cells(pc9, [1, 2]))
    with torch.inference_mode():
        a = model.embed(module, model.collate(out))
        b = model.embed(half, model.collate(out))
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.98


def test_identity_names_the_one_cell_mode(tiny_dir: Path) -> None:
    """The run manifest records the model's identity: it says that each cell is embedded alone (the
    original's default attends across the cells of a sample; docs/fidelity.md says why not here)."""
    ident = get_model("cellplm", {"checkpoint": str(tiny_dir)}).identity()
    assert ident["resolved"] == {"cells_per_pass": 1, "gmvae_cluster": "mode"}
    assert ident["options"]["dtype"] == "upstream"
