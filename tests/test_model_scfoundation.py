"""scFoundation: tokenizer on real cells (hand-checked), strict official checkpoint loading, the embedding
rule against an independent reference built from torch's own nn.TransformerEncoderLayer (what the original
uses), batch independence, presets against the manifest."""

from __future__ import annotations

import csv
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
from scdrugmap_ray.engine.models.scfoundation import (
    GENE_LIST_FILE,
    ScFoundationEncoder,
    ScFoundationModel,
    official_encoder_shapes,
    official_shapes,
)
from torch import nn

GENE_TSV = "assets/scfoundation/OS_scRNA_gene_index.19264.tsv"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real(pc9: dict, shared_dir: Path) -> dict:
    return {**pc9, "gene_list": _gene_list(shared_dir)}


def _gene_list(shared_dir: Path) -> list[str]:
    with open(shared_dir / GENE_TSV) as fh:
        return [row["gene_name"] for row in csv.DictReader(fh, delimiter="\t")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ScFoundationModel.init_random(tmp_path_factory.mktemp("sf") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[ScFoundationModel, torch.nn.Module]:
    model = get_model("scfoundation", {"checkpoint": str(tiny_dir)})
    assert isinstance(model, ScFoundationModel)
    return model, model.load()


def _rewrite(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    obj = torch.load(src / "models.ckpt", weights_only=True)
    edit(obj)
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(obj, dst / "models.ckpt")
    return dst


def _load_error(ckpt: Path, **options: str) -> str:
    model = get_model("scfoundation", {"checkpoint": str(ckpt), **options})
    with pytest.raises(UserError) as err:
        model.load()  # type: ignore[attr-defined]
    return str(err.value)


# ------------------------------------------------------------------------------------------- tokenizer


def test_vendored_gene_list_is_the_official_file(shared_dir: Path) -> None:
    with gzip.open(GENE_LIST_FILE, "rb") as fh:
        vendored = fh.read()
    assert hashlib.sha256(vendored).hexdigest() == hashlib.sha256((shared_dir / GENE_TSV).read_bytes()).hexdigest()


def test_tokenizer_real_cell_hand_checked(real: dict, tiny: tuple) -> None:
    model, _ = tiny
    tok = model.make_tokenizer(real["genes"])
    # 12,206 of the 21,207 store symbols are in the 19,264-gene list (exact symbol match)
    assert tok.n_matched == 12_206
    assert tok.coverage == pytest.approx(12_206 / 21_207)
    ids, gi, vals = _cells(real, [0])
    out = tok(ids, gi, vals)
    got_ids, got_vals = out["input_ids"][0], out["values"][0]
    assert got_ids.dtype == np.int32 and got_vals.dtype == np.float32
    # hand-checked on cell CGTTAGCACGTT: 5,167 expressed genes / 21,054 counts in the file, of which 4,544
    # genes / 19,424 counts are in the list; the original normalises over those 19,264 genes only
    assert ids[0] == "CGTTAGCACGTT"
    assert len(got_ids) == 4_544 + 2
    assert got_ids[:3].tolist() == [8, 16, 17]  # AACS (1 count), AAMDC (2), AAMP (2)
    np.testing.assert_allclose(got_vals[:3], [0.41530125, 0.70786535, 0.70786535], rtol=1e-7)  # log1p(c/19424*1e4)
    assert got_ids[-4:].tolist() == [19261, 19262, 19264, 19265]  # ZYX, ZZEF1, then T, S
    assert got_vals[-2] == 4.0  # T: tgthighres t4 (the original's default)
    assert got_vals[-1] == pytest.approx(math.log10(19424))  # S = log10(total count)

    # the same cell by an independent plain computation over symbols
    sym = real["genes"]["symbol"].tolist()
    counts = {sym[j]: float(v) for j, v in zip(gi[0], vals[0], strict=True)}
    pos = {g: i for i, g in enumerate(real["gene_list"])}
    kept = sorted((pos[g], c) for g, c in counts.items() if g in pos)
    total = sum(c for _, c in kept)
    exp_ids = [p for p, _ in kept] + [19264, 19265]
    exp_vals = [math.log1p(c / total * 1e4) for _, c in kept] + [4.0, math.log10(total)]
    assert got_ids.tolist() == exp_ids
    np.testing.assert_array_equal(got_vals, np.asarray(exp_vals, dtype=np.float64).astype(np.float32))


def test_tokenizer_tgthighres_modes_and_duplicates() -> None:
    genes = pd.DataFrame(
        {
            "position": np.arange(5, dtype=np.int32),
            "symbol": ["A2M", "NOT_A_GENE", "A1BG", "A2M", None],  # A2M twice: the first one counts
            "ensembl_id": [None] * 5,
        }
    )
    gi, vals = [np.array([0, 1, 2, 3, 4], dtype=np.int32)], [np.array([3, 5, 1, 7, 2], dtype=np.float32)]
    a1bg, a2m = 0, 2  # positions in the 19,264 list (A1BG, A1CF, A2M, ...)
    for spec, t in (("f2", math.log10(4 * 2)), ("a0.5", math.log10(4) + 0.5), ("t4.5", 4.5)):
        model = get_model("scfoundation", {"preset": "tiny", "tgthighres": spec})
        tok = model.make_tokenizer(genes)  # type: ignore[attr-defined]
        assert tok.coverage == pytest.approx(2 / 5)
        out = tok(np.array(["c"]), gi, vals)
        assert out["input_ids"][0].tolist() == [a1bg, a2m, 19264, 19265]
        expected = [math.log1p(1 / 4 * 1e4), math.log1p(3 / 4 * 1e4), t, math.log10(4)]
        np.testing.assert_allclose(out["values"][0], expected, rtol=1e-6)
    # pre_normalized T: values as given, total = their sum (as the original)
    tok = get_model("scfoundation", {"preset": "tiny", "pre_normalized": "T"}).make_tokenizer(genes)  # type: ignore[attr-defined]
    out = tok(np.array(["c"]), gi, vals)
    np.testing.assert_allclose(out["values"][0], [1.0, 3.0, 4.0, math.log10(4)], rtol=1e-6)


def test_tokenizer_drops_non_positive_values_like_gather_data() -> None:
    genes = pd.DataFrame({"position": [0, 1], "symbol": ["A1BG", "A2M"], "ensembl_id": [None, None]})
    tok = get_model("scfoundation", {"preset": "tiny"}).make_tokenizer(genes)  # type: ignore[attr-defined]
    # one count in total: S = log10(1) = 0 is not > 0, so the original leaves S out
    out = tok(np.array(["one"]), [np.array([1], dtype=np.int32)], [np.array([1.0], dtype=np.float32)])
    assert out["input_ids"][0].tolist() == [2, 19264]
    # f1 with one count: T = S = 0, only the gene remains
    tok = get_model("scfoundation", {"preset": "tiny", "tgthighres": "f1"}).make_tokenizer(genes)  # type: ignore[attr-defined]
    out = tok(np.array(["one"]), [np.array([1], dtype=np.int32)], [np.array([1.0], dtype=np.float32)])
    assert out["input_ids"][0].tolist() == [2]


def test_low_coverage_is_a_user_error() -> None:
    mouse = pd.DataFrame({"position": [0, 1, 2], "symbol": ["Actb", "Gapdh", "Cd74"], "ensembl_id": [None] * 3})
    with pytest.raises(UserError, match="human gene symbols"):
        get_model("scfoundation", {"preset": "tiny"}).make_tokenizer(mouse)  # type: ignore[attr-defined]


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="tgthighres"):
        get_model("scfoundation", {"preset": "tiny", "tgthighres": "x4"})
    with pytest.raises(UserError, match="version"):
        get_model("scfoundation", {"preset": "tiny", "version": "gene"})
    with pytest.raises(UserError, match="pool_type"):
        get_model("scfoundation", {"preset": "tiny", "pool_type": "mean"})


# ------------------------------------------------------------------------------------------- checkpoint


def test_init_random_writes_the_official_container(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(["models.ckpt", RANDOM_WEIGHTS_MARKER])
    marker = json.loads((tiny_dir / RANDOM_WEIGHTS_MARKER).read_text())
    assert marker == {"model": "scfoundation", "preset": "tiny", "note": "random weights, not pretrained"}
    obj = torch.load(tiny_dir / "models.ckpt", weights_only=True)
    assert sorted(obj) == ["cell", "gene", "rde"]
    sub = obj["cell"]
    assert sorted(sub) == ["config", "state_dict"]
    cfg = sub["config"]
    assert cfg["model"] == "mae_autobin"
    flat = cfg["model_config"]["mae_autobin"]
    assert flat["model"] == "mae_autobin"  # the original's select_model reads it from here
    assert flat["encoder"]["module_type"] == "transformer" and flat["seq_len"] == 19266
    assert cfg["dataset_config"]["rnaseq"]["bin_num"] == flat["bin_num"]
    expected = official_shapes(ScFoundationModel.presets["tiny"])
    assert list(sub["state_dict"]) == ["model." + k for k in expected]
    for k, shape in expected.items():
        assert tuple(sub["state_dict"]["model." + k].shape) == shape, k


def test_100m_preset_matches_the_manifest(shared_dir: Path) -> None:
    manifest = json.loads((shared_dir / "assets/manifests/scfoundation.json").read_text())
    cfg = ScFoundationModel.presets["100m"]
    assert cfg == manifest["config_used"]
    shapes = official_shapes(cfg)
    assert list(shapes) == list(manifest["state_dict"])
    assert shapes == {k: tuple(v) for k, v in manifest["state_dict"].items()}
    assert sum(math.prod(s) for s in shapes.values()) == manifest["n_parameters_total"]
    # the module this package builds (on the meta device: no memory) has exactly the encoder keys
    with torch.device("meta"):
        module = ScFoundationEncoder(cfg)
    renamed = {
        k.replace("in_proj.weight", "in_proj_weight").replace("in_proj.bias", "in_proj_bias"): tuple(v.shape)
        for k, v in module.state_dict().items()
    }
    assert renamed == official_encoder_shapes(cfg)
    assert ScFoundationModel(preset="100m").max_length == 19266


def test_strict_loading(tiny_dir: Path, tmp_path: Path) -> None:
    model = get_model("scfoundation", {"checkpoint": str(tiny_dir), "version": "rde"})
    assert not model.load().training  # type: ignore[attr-defined]

    key = "model.encoder.transformer_encoder.1.linear1.weight"
    ckpt = _rewrite(tiny_dir, tmp_path / "missing", lambda o: o["cell"]["state_dict"].pop(key))
    assert key in _load_error(ckpt) and "missing" in _load_error(ckpt)

    # the MAE decoder is never run by a cell embedding: a file without (part of) it loads (issue 15)
    dec_key = "model.decoder.performer.net.layers.0.0.fn.to_q.weight"
    ckpt = _rewrite(tiny_dir, tmp_path / "missing_dec", lambda o: o["cell"]["state_dict"].pop(dec_key))
    get_model("scfoundation", {"checkpoint": str(ckpt)}).load()  # type: ignore[attr-defined]

    def add(o: dict) -> None:
        o["cell"]["state_dict"]["model.encoder.extra.weight"] = torch.zeros(3)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "extra", add))
    assert "unexpected" in msg and "model.encoder.extra.weight" in msg

    def reshape(o: dict) -> None:
        o["cell"]["state_dict"]["model.token_emb.emb.weight"] = torch.zeros(100, 65)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "shape", reshape))
    assert "model.token_emb.emb.weight" in msg and "(100, 65)" in msg

    def config(o: dict) -> None:  # the config says 3 layers, the weights have 2
        o["cell"]["config"]["model_config"]["mae_autobin"]["encoder"]["depth"] = 3

    assert "model.encoder.transformer_encoder.2." in _load_error(_rewrite(tiny_dir, tmp_path / "depth", config))

    # the other sub-models are not looked at: version ce reads 'cell' only
    ckpt = _rewrite(tiny_dir, tmp_path / "no_rde", lambda o: o.pop("rde"))
    get_model("scfoundation", {"checkpoint": str(ckpt)}).load()  # type: ignore[attr-defined]
    assert "no sub-model 'rde'" in _load_error(ckpt, version="rde")


def test_truncated_and_wrong_checkpoints(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / "models.ckpt").read_bytes()
    for name, cut in (("head", 1000), ("tail", len(data) - 100)):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "models.ckpt").write_bytes(data[:cut])
        assert "truncated or corrupt checkpoint file" in _load_error(bad)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    msg = _load_error(hf)
    assert "models.ckpt" in msg and "config.json" in msg

    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save({"token_emb.mlp.weight": torch.zeros(100, 1)}, plain / "models.ckpt")
    assert "not an official scFoundation models.ckpt" in _load_error(plain)

    unsafe = tmp_path / "unsafe"  # pickled Python objects: refused, never unpickled
    _rewrite(tiny_dir, unsafe, lambda o: o["cell"]["config"].update(path=pathlib.PurePosixPath("x")))
    assert "cannot be loaded safely" in _load_error(unsafe)


# ------------------------------------------------------------------------------------------- embedding


class _Reference(nn.Module):
    """The original's single-cell path from torch built-ins: nn.TransformerEncoderLayer (post-norm, ReLU,
    ff 4 d, batch_first) loaded with the official key names, and the auto-bin token embedding in plain ops."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: dict) -> None:
        super().__init__()
        d, enc = cfg["encoder"]["hidden_dim"], cfg["encoder"]
        self.s = state
        self.alpha = cfg["bin_alpha"]
        self.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d, enc["heads"], 4 * d, batch_first=True) for _ in range(enc["depth"])
        )
        self.norm = nn.LayerNorm(d)
        enc_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        self.load_state_dict(enc_state, strict=True)
        self.eval()

    def forward(self, ids: np.ndarray, vals: np.ndarray) -> torch.Tensor:
        s = self.s
        x = torch.tensor(vals, dtype=torch.float32)[None, :, None]
        h = torch.nn.functional.leaky_relu(x @ s["token_emb.mlp.weight"].T + s["token_emb.mlp.bias"], 0.1)
        h = self.alpha * h + (h @ s["token_emb.mlp2.weight"].T + s["token_emb.mlp2.bias"])
        x = torch.softmax(h, -1) @ s["token_emb.emb.weight"] + s["pos_emb.weight"][torch.tensor(ids, dtype=torch.long)]
        for layer in self.transformer_encoder:
            x = layer(x)
        g = self.norm(x)[0]
        return torch.cat([g[-1], g[-2], g[:-2].max(0).values, g[:-2].mean(0)])


def test_embedding_matches_torch_reference_and_is_batch_independent(real: dict, tiny: tuple, tiny_dir: Path) -> None:
    """Against a transcription of the published code, since scFoundation's model code is not on PyPI (it
    lives in biomap-research/scFoundation, read at d09626a): ``model/get_embedding.py`` lines 155-199
    (log1p(x / total * 1e4) + [T, log10(total)], ``gatherData``, ``token_emb(..., output_weight=0)`` +
    ``pos_emb``, ``encoder``, concat of h[-1], h[-2], max and mean over h[:-2]), ``model/load.py``
    ``gatherData`` (lines 47-73) and ``load_model_frommmf`` (124-147), ``model/pretrainmodels/mae_autobin.py``
    ``AutoDiscretizationEmbedding2.forward`` (lines 43-77) and ``transformer.py``
    ``pytorchTransformerModule.forward`` (33-42: nn.TransformerEncoderLayer stack + LayerNorm). ``_Reference``
    is that transcription, one cell at a time as the original runs. (The published code itself, run once
    on CPU outside this repository on this file's tiny checkpoint and cells 0, 3, 40, 41 and 181 of the
    real data, gave the same 256-d embeddings within 7.2e-7; see docs/fidelity.md.)"""
    model, module = tiny
    tok = model.make_tokenizer(real["genes"])
    rows = [0, 3, 40, 41]  # different lengths, so batches pad differently
    out = tok(*_cells(real, rows))
    with torch.inference_mode():
        batch = model.embed(module, model.collate(out))
        alone = model.embed(module, model.collate({k: v[2:3] for k, v in out.items()}))
        padded = model.embed(module, model.collate({k: v[2:3] for k, v in out.items()}, pad_to=6000))
    assert batch.shape == (4, 4 * 64) and batch.dtype == torch.float32
    assert len({len(x) for x in out["input_ids"]}) == 4
    np.testing.assert_allclose(alone[0].numpy(), batch[2].numpy(), atol=1e-5)
    np.testing.assert_allclose(padded[0].numpy(), batch[2].numpy(), atol=1e-5)

    obj = torch.load(tiny_dir / "models.ckpt", weights_only=True)["cell"]
    state = {k[len("model.") :]: v for k, v in obj["state_dict"].items()}
    ref = _Reference(state, ScFoundationModel.presets["tiny"])
    with torch.inference_mode():
        for i in (0, 2):
            expect = ref(out["input_ids"][i], out["values"][i])
            np.testing.assert_allclose(batch[i].numpy(), expect.numpy(), atol=1e-5)


def test_pool_max_and_degenerate_cells(tiny: tuple, tiny_dir: Path) -> None:
    model, module = tiny
    rows = {
        "input_ids": [np.array([5, 19264, 19265], dtype=np.int32), np.array([2, 19264], dtype=np.int32)],
        "values": [np.array([1.0, 4.0, 3.0], dtype=np.float32), np.array([9.2, 4.0], dtype=np.float32)],
    }
    with torch.inference_mode():
        emb = model.embed(module, model.collate(rows))
        mx = get_model("scfoundation", {"checkpoint": str(tiny_dir), "pool_type": "max"})
        emb_max = mx.embed(module, mx.collate(rows))  # type: ignore[attr-defined]
    assert torch.isfinite(emb).all()
    # a 2-token cell (one count in total, S dropped) has no gene tokens to pool: zeros there
    assert torch.count_nonzero(emb[1, 128:]) == 0 and torch.count_nonzero(emb[1, :128]) > 0
    assert emb_max.shape == (2, 64)
    # a cell with no tokens at all (f1 and no gene of the list) embeds as zeros, its batch-mates unchanged
    empty = {k: [*v, v[0][:0]] for k, v in rows.items()}
    with torch.inference_mode():
        emb3 = model.embed(module, model.collate(empty))
    assert torch.count_nonzero(emb3[2]) == 0
    torch.testing.assert_close(emb3[:2], emb, atol=1e-5, rtol=0)


def test_bf16_module(tiny: tuple, tiny_dir: Path, real: dict) -> None:
    model, module = tiny
    half = model.load(dtype=torch.bfloat16)
    out = model.make_tokenizer(real["genes"])(*_cells(real, [1]))
    with torch.inference_mode():
        a = model.embed(module, model.collate(out))
        b = model.embed(half, model.collate(out))
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99
