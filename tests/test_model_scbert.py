"""scBERT: tokenizer on real cells (hand-checked and against scanpy's own normalize_total + log1p, as the
original's preprocess.py), strict official checkpoint loading, parity with performer-pytorch's PerformerLM
configured as scBERT's (gene2vec table, the original's key stabiliser), batch independence, presets,
LoRA targets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from realcells import cells as _cells
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.scbert import (
    CHECKPOINT_FILE,
    GENE2VEC_FILE,
    N_GENES,
    SEQ_LEN,
    ScBertModel,
    load_gene_order,
    official_shapes,
    pool_cells,
)
from torch import nn

GENE_ORDER = "assets/scbert/gene_order.txt"
TINY = ScBertModel.presets["tiny"]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ScBertModel.init_random(tmp_path_factory.mktemp("scbert") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[ScBertModel, nn.Module]:
    model = get_model("scbert", {"checkpoint": str(tiny_dir)})
    assert isinstance(model, ScBertModel)
    return model, model.load()


@pytest.fixture(scope="module")
def real_tokens(pc9: dict, tiny: tuple) -> dict:
    model, _ = tiny
    rows = [0, 3, 40]
    return {"rows": rows, "out": model.make_tokenizer(pc9["genes"])(*_cells(pc9, rows))}


def _state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_dir / CHECKPOINT_FILE, weights_only=True)["model_state_dict"]


def _rewrite(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    obj = torch.load(src / CHECKPOINT_FILE, weights_only=True)
    result = edit(obj)
    obj = result if isinstance(result, dict) else obj  # an edit may return a new container
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(obj, dst / CHECKPOINT_FILE)
    return dst


def _load_error(ckpt: Path) -> str:
    model = get_model("scbert", {"checkpoint": str(ckpt)})
    with pytest.raises(UserError) as err:
        model.load()  # type: ignore[attr-defined]
    return str(err.value)


# ------------------------------------------------------------------------------------------- tokenizer


def test_vendored_gene_order_is_the_asset(shared_dir: Path) -> None:
    assert load_gene_order() == (shared_dir / GENE_ORDER).read_text().split()
    assert len(load_gene_order()) == N_GENES


#: SHA-256 of the 16,906 symbols joined by newlines, as published by an independent script that checks "the
#: scBERT panglao gene list" before it writes them as the ``var_names`` of a ``panglao_human.h5ad``; its
#: docstring says the list is that file's ``var_names`` in the same order, and the same as Hugging Face
#: ``kaichenxu/cape_scbert``'s ``vocab.json``. Our list comes from nano-scBERT: two independent copies agree.
PANGLAO_ORDER_SHA256 = "4c09ba1912e184682fe5e7f32e2b443bdfb7883d0d0191551b38c6c2f155600f"


def test_gene_order_is_the_published_panglao_order() -> None:
    """The order scBERT's gene2vec rows follow, checked by digest: the real ``panglao_human.h5ad`` (11 GB) cannot
    be downloaded here, but the digest of its gene axis is public (above). One symbol moved, renamed or dropped
    changes it."""
    import hashlib

    assert hashlib.sha256("\n".join(load_gene_order()).encode()).hexdigest() == PANGLAO_ORDER_SHA256


def test_tokenizer_real_cell_hand_checked(pc9: dict, real_tokens: dict) -> None:
    order = load_gene_order()
    ids = real_tokens["out"]["input_ids"][0]
    assert ids.dtype == np.int32 and ids.shape == (SEQ_LEN,) and ids[-1] == 0
    x = pc9["X"][0].toarray()[0]
    symbols = pc9["symbols"]
    in_order = {g: i for i, g in enumerate(order)}
    first = {}
    for j, s in enumerate(symbols):
        first.setdefault(s, j)
    total = sum(x[j] for s, j in first.items() if s in in_order)
    # by hand: the cell's three highest-count genes of the list, and two genes it lacks
    matched = sorted(((x[j], s) for s, j in first.items() if s in in_order), reverse=True)
    for count, sym in matched[:3]:
        expect = min(int(np.log2(1 + count * 1e4 / total)), 5)
        assert ids[in_order[sym]] == expect, sym
    assert matched[0][0] * 1e4 / total > 31  # so the top gene is really clipped to bin 5
    assert ids[in_order[matched[0][1]]] == 5
    zero = [s for s in order if s not in first or x[first[s]] == 0][:2]
    assert all(ids[in_order[s]] == 0 for s in zero)
    assert set(np.unique(ids)) <= set(range(6))


def test_tokenizer_matches_scanpy_preprocessing(pc9: dict, real_tokens: dict) -> None:
    """The original's preprocess.py (Panglao columns, normalize_total 1e4, log1p base 2, float32) and
    predict.py's binning, run with scanpy itself."""
    import anndata as ad
    import scanpy as sc

    order = load_gene_order()
    rows = real_tokens["rows"]
    sub = pc9["X"][rows].toarray().astype(np.float32)
    symbols = pc9["symbols"]
    first: dict[str, int] = {}
    for j, s in enumerate(symbols):
        first.setdefault(s, j)  # preprocess.py: obj.index(ref[i]), the first occurrence
    counts = np.zeros((len(rows), N_GENES), dtype=np.float32)
    for i, g in enumerate(order):
        if g in first:
            counts[:, i] = sub[:, first[g]]
    new = ad.AnnData(X=counts)
    sc.pp.normalize_total(new, target_sum=1e4)
    sc.pp.log1p(new, base=2)
    for k in range(len(rows)):
        full = np.asarray(new.X[k]).copy()
        full[full > 5] = 5
        expect = np.concatenate([torch.from_numpy(full).long().numpy(), [0]])
        got = real_tokens["out"]["input_ids"][k]
        assert (got != expect).sum() == 0, np.flatnonzero(got != expect)[:5]


def test_tokenizer_duplicates_missing_genes_and_pickling() -> None:
    genes = pd.DataFrame(
        {"position": [0, 1, 2, 3], "symbol": ["A2M", "A2M", "NOT_A_GENE", "A1BG"], "ensembl_id": [None] * 4}
    )
    model = ScBertModel(preset="tiny")
    from scdrugmap_ray.engine.models.scbert import ScBertTokenizer

    tok = ScBertTokenizer(genes)
    assert tok.n_matched == 2
    order = load_gene_order()
    out = tok(np.array(["c"]), [np.array([0, 1, 2, 3], dtype=np.int32)], [np.array([10.0, 99.0, 5.0, 1.0])])
    ids = out["input_ids"][0]
    # total = 10 + 1 (the duplicate and the unknown gene are dropped): log2(1 + 10/11*1e4) > 5
    assert ids[order.index("A2M")] == 5
    assert np.log2(1 + 1 / 11 * 1e4) > 9 and ids[order.index("A1BG")] == 5
    assert ids.sum() == 10
    again = pickle.loads(pickle.dumps(tok))(np.array(["c"]), [np.array([3], dtype=np.int32)], [np.array([0.0])])
    assert not again["input_ids"][0].any()  # an all-zero cell: only zeros, no NaN
    natural = ScBertTokenizer(genes, log1p_base="e")
    cell = natural(np.array(["c"]), [np.array([0, 3], dtype=np.int32)], [np.array([3.0, 997.0])])["input_ids"][0]
    assert cell[order.index("A2M")] == int(np.log1p(3 / 1000 * 1e4))  # ln(31) = 3.43
    assert model.max_length == SEQ_LEN


def test_low_coverage_and_bad_options_are_user_errors() -> None:
    genes = pd.DataFrame({"position": [0, 1], "symbol": ["ENSG01", "ENSG02"], "ensembl_id": ["ENSG01", "ENSG02"]})
    from scdrugmap_ray.engine.models.scbert import ScBertTokenizer

    with pytest.raises(UserError, match="human gene symbols"):
        ScBertTokenizer(genes)
    with pytest.raises(UserError, match="pool"):
        get_model("scbert", {"preset": "tiny", "pool": "max"})
    with pytest.raises(UserError, match="log1p_base"):
        get_model("scbert", {"preset": "tiny", "log1p_base": 10})
    with pytest.raises(UserError, match="no preset"):
        ScBertModel.init_random(Path("/nonexistent"), "huge")


# ------------------------------------------------------------------------------------------- checkpoint


def test_init_random_writes_the_official_format(tiny_dir: Path, tiny: tuple) -> None:
    assert (tiny_dir / RANDOM_WEIGHTS_MARKER).is_file()
    obj = torch.load(tiny_dir / CHECKPOINT_FILE, weights_only=True)
    state = obj["model_state_dict"]
    assert list(state) == list(official_shapes(TINY))
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(TINY)
    g2v = np.load(tiny_dir / GENE2VEC_FILE)
    assert g2v.shape == (N_GENES, TINY["dim"])
    pos = state["pos_emb.emb.weight"]
    assert pos.dtype == torch.float64  # as Gene2VecPositionalEmbedding builds it from numpy
    np.testing.assert_array_equal(pos[:N_GENES].numpy(), g2v)
    assert not pos[N_GENES].any()
    # the module's own names are the official ones (only the pretraining head is dropped)
    _, module = tiny
    assert set(module.state_dict()) == {k for k in official_shapes(TINY) if not k.startswith("to_out.")}


def test_panglao_preset_is_the_official_architecture() -> None:
    shapes = official_shapes(ScBertModel.presets["panglao"])
    assert shapes["token_emb.weight"] == (7, 200)
    assert shapes["pos_emb.emb.weight"] == (16_907, 200)
    assert shapes["performer.net.layers.5.0.fn.fast_attention.projection_matrix"] == (266, 64)
    assert shapes["performer.net.layers.5.0.fn.to_q.weight"] == (640, 200)
    assert shapes["performer.net.layers.5.0.fn.to_out.weight"] == (200, 640)
    assert shapes["performer.net.layers.5.1.fn.fn.w1.weight"] == (800, 200)
    assert shapes["to_out.weight"] == (7, 200)
    assert "performer.net.layers.6.0.norm.weight" not in shapes
    assert "performer.net.layers.0.0.fn.to_q.bias" not in shapes  # qkv_bias=False
    assert len(shapes) == 3 + 6 * 14 + 4  # per layer: 8 attention + 6 feed-forward keys


def test_strict_loading(tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    key = "performer.net.layers.1.0.fn.to_v.weight"
    ckpt = _rewrite(tiny_dir, tmp_path / "missing", lambda o: o["model_state_dict"].pop(key))
    msg = _load_error(ckpt)
    assert "missing keys" in msg and key in msg

    # the released file's pretraining head (to_out) is skipped and named in one log line (issue 15)
    with caplog.at_level(logging.INFO, logger="scdrugmap_ray.engine.models.checkpoint"):
        get_model("scbert", {"checkpoint": str(tiny_dir)}).load()  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 2 tensor(s)" in lines[0] and "to_out.bias, to_out.weight" in lines[0]
    # a file without the head (encoder only) loads too: the embedding never runs it
    ckpt = _rewrite(tiny_dir, tmp_path / "head", lambda o: [o["model_state_dict"].pop(k) for k in ("to_out.bias",
                                                                                                  "to_out.weight")])
    get_model("scbert", {"checkpoint": str(ckpt)}).load()  # type: ignore[attr-defined]

    def add(o: dict) -> None:
        o["model_state_dict"]["performer.net.layers.0.0.fn.to_q.bias"] = torch.zeros(32)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "extra", add))
    assert "unexpected keys" in msg and "performer.net.layers.0.0.fn.to_q.bias" in msg

    def reshape(o: dict) -> None:
        o["model_state_dict"]["norm.weight"] = torch.ones(33)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "shape", reshape))
    assert "norm.weight" in msg and "(33,)" in msg and "(32,)" in msg

    def rows(o: dict) -> None:
        o["model_state_dict"]["pos_emb.emb.weight"] = torch.zeros(8193, 32)

    assert "16907" in _load_error(_rewrite(tiny_dir, tmp_path / "rows", rows))

    def no_emb(o: dict) -> None:
        o["model_state_dict"].pop("token_emb.weight")

    assert "token_emb.weight" in _load_error(_rewrite(tiny_dir, tmp_path / "noemb", no_emb))

    # a bare state dict, and one saved through the DDP wrapper ("module." prefix), load as well
    bare = _rewrite(tiny_dir, tmp_path / "bare", lambda o: o["model_state_dict"])
    get_model("scbert", {"checkpoint": str(bare)}).load()  # type: ignore[attr-defined]

    def wrap(o: dict) -> dict:
        return {"model_state_dict": {"module." + k: v for k, v in o["model_state_dict"].items()}}

    get_model("scbert", {"checkpoint": str(_rewrite(tiny_dir, tmp_path / "ddp", wrap))}).load()  # type: ignore[attr-defined]


def test_wrong_and_truncated_files(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    msg = _load_error(empty)
    assert CHECKPOINT_FILE in msg and "config.json" in msg
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / CHECKPOINT_FILE).write_bytes((tiny_dir / CHECKPOINT_FILE).read_bytes()[:5000])
    assert "truncated or corrupt" in _load_error(cut)
    unsafe = _rewrite(tiny_dir, tmp_path / "unsafe", lambda o: o.update(path=Path("x")))
    assert "cannot be loaded safely" in _load_error(unsafe)


# ------------------------------------------------------------------------------------------- embedding


def _original_softmax_kernel(data, *, projection_matrix, is_query, normalize_data=True, eps=1e-4, device=None):  # type: ignore[no-untyped-def]
    """The kernel of scBERT's bundled performer_pytorch.py: queries stabilised per row, keys by ONE maximum
    over the whole tensor (torch.max(data_dash))."""
    normalizer = data.shape[-1] ** -0.25 if normalize_data else 1.0
    ratio = projection_matrix.shape[0] ** -0.5
    dash = torch.einsum("...id,jd->...ij", normalizer * data, projection_matrix.type_as(data))
    diag = (data**2).sum(-1, keepdim=True) / 2.0 * normalizer**2
    stab = torch.max(dash, dim=-1, keepdim=True).values if is_query else torch.max(dash)
    return (ratio * (torch.exp(dash - diag - stab) + eps)).type_as(data)


def _reference(state: dict[str, torch.Tensor], cfg: dict) -> nn.Module:
    """performer-pytorch's PerformerLM configured as scBERT's (qkv without bias, output bias, no rotary,
    an absolute position table that holds gene2vec) loaded with the official weights."""
    from performer_pytorch import PerformerLM

    ref = PerformerLM(
        num_tokens=cfg["num_tokens"], max_seq_len=cfg["max_seq_len"], dim=cfg["dim"], depth=cfg["depth"],
        heads=cfg["heads"], dim_head=cfg["dim_head"], nb_features=cfg["nb_features"], ff_mult=cfg["ff_mult"],
        rotary_position_emb=False, qkv_bias=False, attn_out_bias=True,
    )
    mapped = {}
    for k, v in state.items():
        if k == "performer.calls_since_last_redraw":
            mapped["performer.proj_updater.calls_since_last_redraw"] = v
            continue
        mapped[k] = v
        if k.startswith("performer.net."):  # 1.1.4's ProjectionUpdater holds the same layers again
            mapped["performer.proj_updater.instance." + k[len("performer.net.") :]] = v
    ref.load_state_dict(mapped, strict=True)
    # the original's Gene2VecPositionalEmbedding: a float64 table added in place to the float32 tokens
    ref.pos_emb.emb.weight.data = state["pos_emb.emb.weight"].clone()
    return ref.eval()


def test_parity_with_performer_pytorch_and_batch_independence(
    tiny: tuple, tiny_dir: Path, real_tokens: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import performer_pytorch.performer_pytorch as pp

    model, module = tiny
    cells = real_tokens["out"]["input_ids"][:2]
    with torch.inference_mode():
        both = model.collate({"input_ids": cells})
        batch = model.embed(module, both)
        alone = model.embed(module, model.collate({"input_ids": cells[1:]}, pad_to=SEQ_LEN))
        last = pool_cells(module(both["input_ids"]), "last")
    assert batch.shape == (2, TINY["dim"]) and batch.dtype == torch.float32
    np.testing.assert_allclose(alone[0].numpy(), batch[1].numpy(), atol=1e-5)

    ref = _reference(_state(tiny_dir), TINY)
    ids = torch.from_numpy(cells[1]).long()[None]  # one cell at a time, as predict.py
    with torch.inference_mode():
        stock = ref(ids, return_encodings=True)
        monkeypatch.setattr(pp, "softmax_kernel", _original_softmax_kernel)
        enc = ref(ids, return_encodings=True)
    np.testing.assert_allclose(batch[1].numpy(), enc.mean(1)[0].numpy(), atol=2e-5)
    np.testing.assert_allclose(last[1].numpy(), enc[0, -1].numpy(), atol=2e-5)
    # stock performer-pytorch (one key maximum per head) differs only through the kernel's eps
    assert (stock.mean(1)[0] - enc.mean(1)[0]).abs().max() < 1e-2


def test_projections_are_never_redrawn(tiny: tuple, tiny_dir: Path) -> None:
    _, module = tiny
    before = {k: v.clone() for k, v in module.state_dict().items() if k.endswith("projection_matrix")}
    module.train()
    try:
        with torch.no_grad():
            for _ in range(2):  # any length up to 16,907 runs; short keeps the test fast
                module(torch.zeros(1, 256, dtype=torch.long))
    finally:
        module.eval()
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(before["performer.net.layers.0.0.fn.fast_attention.projection_matrix"],
                       _state(tiny_dir)["performer.net.layers.0.0.fn.fast_attention.projection_matrix"])


def test_collate_refuses_other_lengths(tiny: tuple) -> None:
    model, _ = tiny
    with pytest.raises(ValueError):
        model.collate({"input_ids": [np.zeros(10, dtype=np.int32)]})
    with pytest.raises(ValueError):
        model.collate({"input_ids": [np.zeros(SEQ_LEN, dtype=np.int32)]}, pad_to=SEQ_LEN + 1)


def test_bf16_module(tiny: tuple, tiny_dir: Path, real_tokens: dict) -> None:
    model, module = tiny
    assert next(model.load(dtype=torch.bfloat16).parameters()).dtype == torch.float32  # dtype: upstream (fp32)
    half = get_model("scbert", {"checkpoint": str(tiny_dir), "dtype": "engine"}).load(dtype=torch.bfloat16)  # type: ignore[attr-defined]
    ids = torch.from_numpy(real_tokens["out"]["input_ids"][0][:4000]).long()[None]
    with torch.inference_mode():
        a = module(ids).mean(1)
        b = half(ids).float().mean(1)
    assert half.token_emb.weight.dtype == torch.bfloat16
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0.1)
