"""CellLM: tokenizer on real cells (hand-checked), strict loading of the official checkpoint layout, the
embedding rule against a literal plain-torch transcription of the original's forward (every cell padded to
6,000, batch-wide key stabiliser, one cell per batch), batch independence, presets, LoRA targets."""

from __future__ import annotations

import json
import math
import pathlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from realcells import cells as _cells
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.celllm import (
    CONFIG_FILE,
    DEFAULT_WEIGHTS_FILE,
    GENE_LIST_FILE,
    CellLMEncoder,
    CellLMModel,
    official_shapes,
    resolve_config,
)

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return CellLMModel.init_random(tmp_path_factory.mktemp("celllm") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[CellLMModel, CellLMEncoder]:
    model = get_model("celllm", {"checkpoint": str(tiny_dir)})
    assert isinstance(model, CellLMModel)
    return model, model.load()


@pytest.fixture(scope="module")
def gene_list(tiny_dir: Path) -> list[str]:
    return (tiny_dir / GENE_LIST_FILE).read_text().split()


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    _copy(src, dst)
    obj = torch.load(dst / DEFAULT_WEIGHTS_FILE, weights_only=True)
    edit(obj)
    torch.save(obj, dst / DEFAULT_WEIGHTS_FILE)
    return dst


def _load_error(ckpt: Path) -> str:
    model = get_model("celllm", {"checkpoint": str(ckpt)})
    with pytest.raises(UserError) as err:
        model.load()  # type: ignore[attr-defined]
    return str(err.value)


def _plain_values(real: dict, row: int, gene_list: list[str], log=math.log2) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """gene position -> normalised value of one store row, by plain Python over symbols."""
    _, gi, vals = _cells(real, [row])
    sym = real["genes"]["symbol"].tolist()
    pos = {g: i for i, g in enumerate(gene_list)}
    counts = {pos[sym[j]]: float(v) for j, v in zip(gi[0], vals[0], strict=True) if sym[j] in pos}
    total = sum(counts.values())
    return {p: log(1 + c / total * 1e4) for p, c in counts.items()}


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_real_cells_hand_checked(pc9: dict, tiny: tuple, gene_list: list[str]) -> None:
    model, _ = tiny
    tok = model.make_tokenizer(pc9["genes"])
    # the stand-in list (19,379 symbols in Entrez order) holds 11,932 of the 21,207 store symbols
    assert len(gene_list) == 19_379 and tok.n_matched == 11_932
    out = tok(*_cells(pc9, [0, 40]))
    ids0, toks0 = out["input_ids"][0], out["tokens"][0]
    assert ids0.dtype == np.int32 and toks0.dtype == np.int32
    # cell CGTTAGCACGTT: 4,467 expressed genes / 18,162 counts in the list; CLS (gene 19,379, token 6) first
    assert len(ids0) == 1 + 4_467
    assert ids0[:4].tolist() == [19_379, 7, 14, 19] and toks0[:4].tolist() == [6, 1, 0, 0]
    # AAMP (2 counts): log2(1 + 2 / 18162 x 1e4) = 1.07 -> 1; ABCB7 (1 count): log2(1.55) = 0.63 -> 0
    assert gene_list[7] == "AAMP" and gene_list[14] == "ABCB7"
    # FTL (223 counts): log2(1 + 223 / 18162 x 1e4) = 6.95, capped at 5
    ftl = gene_list.index("FTL")
    assert toks0[ids0.tolist().index(ftl)] == 5
    assert np.bincount(toks0).tolist() == [1996, 1817, 411, 145, 70, 28, 1]
    # cell GGGAATCAATCG (5,526 counts in the list): one count is log2(1 + 1.81) = 1.49 -> 1, so no token 0
    assert out["tokens"][1][:3].tolist() == [6, 1, 1] and 0 not in out["tokens"][1]

    for row in (0, 3, 40):  # whole cells against a plain computation
        got = tok(*_cells(pc9, [row]))
        plain = _plain_values(pc9, row, gene_list)
        exp_ids = [19_379, *sorted(plain)]
        exp_toks = [6] + [int(min(plain[p], 5.0)) for p in sorted(plain)]
        assert got["input_ids"][0].tolist() == exp_ids
        assert got["tokens"][0].tolist() == exp_toks


def test_tokenizer_truncation_cap_order_and_duplicates(gene_list: list[str], tiny_dir: Path) -> None:
    genes = pd.DataFrame(
        {
            "position": np.arange(7002, dtype=np.int32),
            # store order reversed against the list; the last two repeat a symbol (first occurrence wins)
            "symbol": [*gene_list[:7000][::-1], gene_list[0], "NOT_A_GENE"],
            "ensembl_id": [None] * 7002,
        }
    )
    model = get_model("celllm", {"checkpoint": str(tiny_dir), "normalize": "none"})
    tok = model.make_tokenizer(genes)  # type: ignore[attr-defined]
    assert tok.n_matched == 7000
    vals = np.full(7002, 0.5, dtype=np.float32)
    vals[6999] = 5.7  # store position 6999 = list gene 0
    vals[6998] = 100.0  # list gene 1
    vals[6997] = 1.999  # list gene 2
    vals[7000] = 9.0  # the duplicate of gene 0: ignored
    out = tok(np.array(["c"]), [np.arange(7002, dtype=np.int32)], [vals])
    ids, toks = out["input_ids"][0], out["tokens"][0]
    # the original keeps CLS + the first 5,999 genes in gene order (not the most expressed ones)
    assert len(ids) == 6000 and ids.tolist() == [19_379, *range(5999)]
    assert toks[:5].tolist() == [6, 5, 5, 1, 0]  # CLS, 5.7 -> 5, 100 -> 5 (cap), 1.999 -> 1, 0.5 -> 0
    # values <= 0 are not tokens (the original keeps input_seq > 0)
    out = tok(np.array(["d"]), [np.array([6999, 6998], dtype=np.int32)], [np.array([-1.0, 2.0], dtype=np.float32)])
    assert out["input_ids"][0].tolist() == [19_379, 1] and out["tokens"][0].tolist() == [6, 2]


def test_normalize_options(pc9: dict, gene_list: list[str], tiny_dir: Path) -> None:
    ln = get_model("celllm", {"checkpoint": str(tiny_dir), "normalize": "ln"}).make_tokenizer(pc9["genes"])  # type: ignore[attr-defined]
    got = ln(*_cells(pc9, [3]))
    plain = _plain_values(pc9, 3, gene_list, log=math.log)
    assert got["tokens"][0].tolist() == [6] + [int(min(plain[p], 5.0)) for p in sorted(plain)]
    raw = get_model("celllm", {"checkpoint": str(tiny_dir), "normalize": "none"}).make_tokenizer(pc9["genes"])  # type: ignore[attr-defined]
    _, gi, vals = _cells(pc9, [3])
    got = raw(np.array(["x"]), gi, vals)
    sym = pc9["genes"]["symbol"].tolist()
    pos = {g: i for i, g in enumerate(gene_list)}
    counts = sorted((pos[sym[j]], int(v)) for j, v in zip(gi[0], vals[0], strict=True) if sym[j] in pos)
    assert got["tokens"][0].tolist() == [6] + [min(c, 5) for _, c in counts]


def test_user_errors_for_options_and_genes(tiny_dir: Path) -> None:
    with pytest.raises(UserError, match="pool"):
        get_model("celllm", {"preset": "tiny", "pool": "max"})
    with pytest.raises(UserError, match="normalize"):
        get_model("celllm", {"preset": "tiny", "normalize": "log10"})
    mouse = pd.DataFrame({"position": [0, 1, 2], "symbol": ["Actb", "Gapdh", "Cd74"], "ensembl_id": [None] * 3})
    with pytest.raises(UserError, match="gene list"):
        get_model("celllm", {"checkpoint": str(tiny_dir)}).make_tokenizer(mouse)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- checkpoint


def test_init_random_writes_the_official_layout(tiny_dir: Path) -> None:
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted([CONFIG_FILE, DEFAULT_WEIGHTS_FILE, GENE_LIST_FILE, RANDOM_WEIGHTS_MARKER])
    cfg = json.loads((tiny_dir / CONFIG_FILE).read_text())
    st = cfg["network"]["structure"]
    assert cfg["model"] == "celllm" and cfg["data"]["cell"]["featurizer"]["structure"]["name"] == "Fullseq"
    assert st["param_key"] == "model_state_dict" and st["ckpt_path"].endswith("/" + DEFAULT_WEIGHTS_FILE)
    assert (st["num_tokens"], st["max_seq_len"], st["gene_num"]) == (8, 6000, 19_379)
    obj = torch.load(tiny_dir / DEFAULT_WEIGHTS_FILE, weights_only=True)
    assert list(obj) == ["model_state_dict"]
    state = obj["model_state_dict"]
    expected = official_shapes(resolve_config(CellLMModel.presets["tiny"]))
    assert list(state) == list(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    pe = state["pos_emb.emb.weight"]  # Gene2VecPositionalEmbedding: float64 gene2vec, then CLS ones, PAD zeros
    assert pe.dtype == torch.float64 and bool((pe[-2] == 1).all()) and bool((pe[-1] == 0).all())
    # the module this package builds has exactly the official keys
    built = CellLMEncoder(resolve_config(CellLMModel.presets["tiny"])).state_dict()
    assert {k: tuple(v.shape) for k, v in built.items()} == expected


def test_real_preset_is_the_released_architecture() -> None:
    cfg = resolve_config(CellLMModel.presets["celllm"])
    assert (cfg["dim"], cfg["depth"], cfg["heads"], cfg["dim_head"], cfg["nb_features"]) == (512, 10, 16, 64, 266)
    assert (cfg["gene_num"], cfg["max_seq_len"], cfg["num_tokens"], cfg["qkv_bias"]) == (19_379, 6000, 8, False)
    shapes = official_shapes(cfg)
    assert shapes["pos_emb.emb.weight"] == (19_381, 512)  # gene2vec 19,379 x 512 + CLS + PAD
    assert shapes["performer.net.layers.9.0.fn.to_q.weight"] == (1024, 512)
    assert "performer.net.layers.0.0.fn.to_q.bias" not in shapes
    buffers = ("projection_matrix", "calls_since_last_redraw")
    n_params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(buffers))
    assert n_params == 51_926_536  # "over 50 million parameters" (the CellLM paper)
    assert CellLMModel(preset="celllm").presets["celllm"]["max_seq_len"] == 6000


def test_strict_loading(tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    # the LM head is skipped and named in one log line; a file without it loads too (issue 15)
    with caplog.at_level(logging.INFO, logger="scdrugmap_ray.engine.models.checkpoint"):
        get_model("celllm", {"checkpoint": str(tiny_dir)}).load()  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "to_out.bias, to_out.weight" in lines[0]
    no_head = _rewrite(tiny_dir, tmp_path / "no_head",
                       lambda o: [o["model_state_dict"].pop(k) for k in ("to_out.weight", "to_out.bias")])
    get_model("celllm", {"checkpoint": str(no_head)}).load()  # type: ignore[attr-defined]

    key = "performer.net.layers.1.0.fn.to_k.weight"
    msg = _load_error(_rewrite(tiny_dir, tmp_path / "missing", lambda o: o["model_state_dict"].pop(key)))
    assert "missing keys" in msg and key in msg

    def add(o: dict) -> None:
        o["model_state_dict"]["performer.net.layers.0.0.fn.to_q.bias"] = torch.zeros(32)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "extra", add))
    assert "unexpected keys" in msg and "performer.net.layers.0.0.fn.to_q.bias" in msg

    def reshape(o: dict) -> None:
        o["model_state_dict"]["token_emb.weight"] = torch.zeros(7, 32)

    msg = _load_error(_rewrite(tiny_dir, tmp_path / "shape", reshape))
    assert "token_emb.weight" in msg and "(7, 32)" in msg

    deeper = _copy(tiny_dir, tmp_path / "depth")  # the config says 3 layers, the weights have 2
    cfg = json.loads((deeper / CONFIG_FILE).read_text())
    cfg["network"]["structure"]["depth"] = 3
    (deeper / CONFIG_FILE).write_text(json.dumps(cfg))
    assert "performer.net.layers.2." in _load_error(deeper)

    plain = _rewrite(tiny_dir, tmp_path / "plain", lambda o: o.update(o.pop("model_state_dict")))
    assert "no 'model_state_dict' entry" in _load_error(plain)
    cfg = json.loads((plain / CONFIG_FILE).read_text())
    cfg["network"]["structure"]["param_key"] = ""  # as the original: an empty param_key reads a plain state dict
    (plain / CONFIG_FILE).write_text(json.dumps(cfg))
    get_model("celllm", {"checkpoint": str(plain)}).load()  # type: ignore[attr-defined]


def test_checkpoint_directory_errors(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / DEFAULT_WEIGHTS_FILE).read_bytes()
    cut = _copy(tiny_dir, tmp_path / "cut")
    (cut / DEFAULT_WEIGHTS_FILE).write_bytes(data[:1000])
    assert "truncated or corrupt checkpoint file" in _load_error(cut)

    unsafe = _rewrite(tiny_dir, tmp_path / "unsafe", lambda o: o.update(path=pathlib.PurePosixPath("x")))
    assert "cannot be loaded safely" in _load_error(unsafe)

    # no config: the released config is assumed and the only .pth file is the weights (the real size, so
    # the tiny weights do not match it)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "CellLM.pth").write_bytes(data)
    msg = _load_error(bare)
    assert "missing keys" in msg and "performer.net.layers.2." in msg
    (bare / "other.pth").write_bytes(data)
    assert "expected one CellLM weights file" in _load_error(bare)

    no_genes = _copy(tiny_dir, tmp_path / "no_genes")
    (no_genes / GENE_LIST_FILE).unlink()
    genes = pd.DataFrame({"position": [0], "symbol": ["A1BG"], "ensembl_id": [None]})
    with pytest.raises(UserError, match=r"gene_list\.txt"):
        get_model("celllm", {"checkpoint": str(no_genes)}).make_tokenizer(genes)  # type: ignore[attr-defined]
    (no_genes / GENE_LIST_FILE).write_text("A1BG\nA2M\n")
    with pytest.raises(UserError, match="2 genes"):
        get_model("celllm", {"checkpoint": str(no_genes)}).make_tokenizer(genes)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- embedding


def _original_cls(state: dict[str, torch.Tensor], cfg: dict, dense: torch.Tensor) -> torch.Tensor:
    """PerformerLM_CellLM.forward(x, return_encodings=True)[0][:, 0] for ONE cell, transcribed in plain
    torch: dense row -> tokens, padded to max_seq_len, FAVOR+ with the global key max, final norm x mask."""
    s = {k: v.double() if k == "pos_emb.emb.weight" else v.float() for k, v in state.items()}
    nt, g, n_max = cfg["num_tokens"], cfg["gene_num"], cfg["max_seq_len"]
    keep = dense > 0
    exp = dense[keep].clone()
    exp[exp > nt - 3] = nt - 3
    exp = torch.cat([torch.tensor([nt - 2]), exp.long()])
    pos = torch.cat([torch.tensor([g]), torch.arange(g)[keep]])
    n = min(len(exp), n_max)
    tokens = torch.full((n_max,), nt - 1)
    genes = torch.full((n_max,), g + 1)
    mask = torch.zeros(n_max, dtype=torch.bool)
    tokens[:n], genes[:n], mask[:n] = exp[:n], pos[:n], True
    x = (s["token_emb.weight"][tokens].double() + s["pos_emb.emb.weight"][genes]).float()
    heads, dh, d = cfg["heads"], cfg["dim_head"], cfg["dim"]

    def kernel(data: torch.Tensor, proj: torch.Tensor, is_query: bool) -> torch.Tensor:
        dn = data.shape[-1] ** -0.25
        dash = (dn * data) @ proj.T
        diag = (data**2).sum(-1, keepdim=True) / 2.0 * dn**2
        stab = dash.max(-1, keepdim=True).values if is_query else dash.max()
        return proj.shape[0] ** -0.5 * (torch.exp(dash - diag - stab) + 1e-4)

    for i in range(cfg["depth"]):
        p = f"performer.net.layers.{i}."
        h = F.layer_norm(x, (d,), s[p + "0.norm.weight"], s[p + "0.norm.bias"])
        q, k, v = (h @ s[p + f"0.fn.{w}.weight"].T for w in ("to_q", "to_k", "to_v"))
        q, k, v = (t.view(n_max, heads, dh).transpose(0, 1) for t in (q, k, v))
        v = v.masked_fill(~mask[None, :, None], 0.0)
        proj = s[p + "0.fn.fast_attention.projection_matrix"]
        qf, kf = kernel(q, proj, True), kernel(k, proj, False)
        out = (qf @ (kf.transpose(-1, -2) @ v)) / (qf @ kf.sum(-2, keepdim=True).transpose(-1, -2))
        out = out.transpose(0, 1).reshape(n_max, heads * dh)
        x = x + out @ s[p + "0.fn.to_out.weight"].T + s[p + "0.fn.to_out.bias"]
        h = F.layer_norm(x, (d,), s[p + "1.norm.weight"], s[p + "1.norm.bias"])
        h = F.gelu(h @ s[p + "1.fn.fn.w1.weight"].T + s[p + "1.fn.fn.w1.bias"])
        x = x + h @ s[p + "1.fn.fn.w2.weight"].T + s[p + "1.fn.fn.w2.bias"]
    x = F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"]) * mask[:, None]
    return x[0]


def test_embedding_matches_the_literal_original_and_is_batch_independent(
    pc9: dict, tiny: tuple, tiny_dir: Path, gene_list: list[str]
) -> None:
    model, module = tiny
    tok = model.make_tokenizer(pc9["genes"])
    rows = [181, 180, 40, 194]  # different lengths (about 1,400 to 2,400 tokens)
    out = tok(*_cells(pc9, rows))
    with torch.inference_mode():
        batch = model.embed(module, model.collate(out))
        alone = model.embed(module, model.collate({k: v[2:3] for k, v in out.items()}))
        padded = model.embed(module, model.collate({k: v[2:3] for k, v in out.items()}, pad_to=6000))
    assert batch.shape == (4, 32) and batch.dtype == torch.float32
    assert len({len(x) for x in out["input_ids"]}) == 4
    np.testing.assert_allclose(alone[0].numpy(), batch[2].numpy(), atol=1e-5)
    np.testing.assert_allclose(padded[0].numpy(), batch[2].numpy(), atol=1e-5)

    state = torch.load(tiny_dir / DEFAULT_WEIGHTS_FILE, weights_only=True)["model_state_dict"]
    cfg = resolve_config(CellLMModel.presets["tiny"])
    with torch.inference_mode():
        for i in (0, 2):
            dense = torch.zeros(19_379)
            for p, val in _plain_values(pc9, rows[i], gene_list).items():
                dense[p] = val
            expect = _original_cls(state, cfg, dense)
            np.testing.assert_allclose(batch[i].numpy(), expect.numpy(), atol=2e-5)


def test_long_cell_and_mean_pool(tiny: tuple, tiny_dir: Path) -> None:
    model, module = tiny
    rng = np.random.default_rng(0)
    long_ids = np.concatenate([[19_379], np.sort(rng.choice(19_379, 5999, replace=False))]).astype(np.int32)
    rows = {
        "input_ids": [long_ids, np.array([19_379, 4, 9], dtype=np.int32), np.array([19_379], dtype=np.int32)],
        "tokens": [
            np.concatenate([[6], rng.integers(0, 6, 5999)]).astype(np.int32),
            np.array([6, 2, 5], dtype=np.int32),
            np.array([6], dtype=np.int32),
        ],
    }
    state = torch.load(tiny_dir / DEFAULT_WEIGHTS_FILE, weights_only=True)["model_state_dict"]
    cfg = resolve_config(CellLMModel.presets["tiny"])
    dense = torch.zeros(19_379)
    values = torch.from_numpy(rows["tokens"][0][1:].astype(np.float32)) + 0.5  # token t <- value t + 0.5
    dense[torch.from_numpy(long_ids[1:].astype(np.int64))] = values
    with torch.inference_mode():
        emb = model.embed(module, model.collate(rows))  # a 6,000-token cell: no pad token weight left
        np.testing.assert_allclose(emb[0].numpy(), _original_cls(state, cfg, dense).numpy(), atol=2e-5)
        mean = get_model("celllm", {"checkpoint": str(tiny_dir), "pool": "mean"})
        emb_mean = mean.embed(module, mean.collate(rows))  # type: ignore[attr-defined]
        hidden = module(**{k: v for k, v in model.collate({k: v[1:2] for k, v in rows.items()}).items()})
    assert torch.isfinite(emb).all() and torch.isfinite(emb_mean).all()
    torch.testing.assert_close(emb_mean[1], hidden[0, 1:3].mean(0), atol=1e-5, rtol=0)
    assert torch.count_nonzero(emb_mean[2]) == 0  # a cell with no gene of the list: zeros for mean


def test_gradient_path_equals_inference_path(tiny: tuple) -> None:
    model, module = tiny
    rng = np.random.default_rng(1)
    ids = [np.concatenate([[19_379], np.sort(rng.choice(19_379, n, replace=False))]).astype(np.int32) for n in (40, 7)]
    batch = model.collate(
        {"input_ids": ids, "tokens": [np.concatenate([[6], rng.integers(0, 6, len(i) - 1)]) for i in ids]}
    )
    with torch.inference_mode():
        fast = model.embed(module, batch)
    w = module.performer.net.layers[0][0].fn.to_q.weight
    w.requires_grad_(True)
    try:
        slow = model.embed(module, batch)  # autograd path (no in-place kernel), as LoRA training runs it
        slow.sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()
    finally:
        w.requires_grad_(False)
        w.grad = None
    torch.testing.assert_close(slow.detach(), fast, atol=1e-5, rtol=0)


def test_parity_with_performer_pytorch(pc9: dict, tiny: tuple, tiny_dir: Path) -> None:
    """Against the upstream performer code: OpenBioMed's ``PerformerLM_CellLM``
    (``open_biomed/models/cell/performer_celllm.py`` @ ce3ccab; OpenBioMed is not installable here: its
    requirements pin torch 1.x / torch-geometric) builds its blocks from a copy of performer-pytorch, which IS
    installed (1.1.4): ``performer_pytorch.Performer`` with the same depth/heads/dim_head/nb_features/qkv_bias,
    loaded with this checkpoint's ``performer.*`` tensors, run on token_emb + pos_emb of real cells padded to
    6,000 exactly as the original pads them (token 7 at gene 19,381; ``mask`` zeroes the padded values,
    padded keys stay), then the final LayerNorm, CLS row. The only difference left is the key stabiliser
    (performer-pytorch: max per cell and head; the original: over the batch; here: over the cell), which
    cancels in the attention ratio except for its eps = 1e-4 term: equal within 1e-3 (measured: 2.8e-5 and
    3.1e-4 on the two cells)."""
    from performer_pytorch import Performer

    model, _ = tiny
    module = model.load()  # a fresh copy: other tests hand the shared module to LoRA / autograd
    cfg = resolve_config(CellLMModel.presets["tiny"])
    ref = Performer(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"], dim_head=cfg["dim_head"],
                    nb_features=cfg["nb_features"], qkv_bias=cfg["qkv_bias"], ff_mult=cfg["ff_mult"]).eval()
    state = torch.load(tiny_dir / DEFAULT_WEIGHTS_FILE, weights_only=True)["model_state_dict"]
    ref_state = {}
    for k in ref.state_dict():
        src = "performer." + k.replace("proj_updater.instance.", "net.").replace("proj_updater.", "")
        ref_state[k] = state[src]
    ref.load_state_dict(ref_state, strict=True)

    rows = [181, 40]
    out = model.make_tokenizer(pc9["genes"])(*_cells(pc9, rows))
    pad_gene, pad_token, n = cfg["gene_num"] + 1, cfg["num_tokens"] - 1, cfg["max_seq_len"]
    with torch.inference_mode():
        got = model.embed(module, model.collate(out))
        for i in range(len(rows)):
            genes = torch.full((1, n), pad_gene, dtype=torch.long)
            toks = torch.full((1, n), pad_token, dtype=torch.long)
            length = len(out["input_ids"][i])
            genes[0, :length] = torch.from_numpy(out["input_ids"][i].astype(np.int64))
            toks[0, :length] = torch.from_numpy(out["tokens"][i].astype(np.int64))
            x = state["token_emb.weight"][toks] + state["pos_emb.emb.weight"].float()[genes]
            h = ref(x, mask=toks != pad_token)
            want = F.layer_norm(h, (cfg["dim"],), state["norm.weight"], state["norm.bias"])[0, 0]
            np.testing.assert_allclose(got[i].numpy(), want.numpy(), atol=1e-3)
