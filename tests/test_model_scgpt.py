"""scGPT: tokenizer on real cells (hand-checked binning, sampling of long cells), strict loading of the
official best_model.pt (flash-attn Wqkv names, or scGPT's renamed in_proj names), the CLS embedding against
an independent reference built from torch's nn.TransformerEncoderLayer (the original's non-flash path),
batch independence, presets against the manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import pathlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from realcells import cells as _cells
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.scgpt import (
    CENSUS_VOCAB_FILE,
    HUMAN_ARGS_FILE,
    ScGPTEncoder,
    ScGPTModel,
    bin_values,
    cell_rng,
    config_from_args,
    official_encoder_shapes,
    official_shapes,
    released_shapes,
)
from torch import nn

N_VOCAB = 60_694  # genes in the census vocabulary; <pad>, <cls>, <eoc> follow
PAD, CLS = 60_694, 60_695


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real(pc9: dict, shared_dir: Path) -> dict:
    return {**pc9, "vocab": json.loads((shared_dir / "assets/scgpt/default_census_vocab.json").read_text())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ScGPTModel.init_random(tmp_path_factory.mktemp("scgpt") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[ScGPTModel, torch.nn.Module]:
    model = get_model("scgpt", {"checkpoint": str(tiny_dir)})
    assert isinstance(model, ScGPTModel)
    return model, model.load()


def _copy_ckpt(src: Path, dst: Path, edit=None) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dst)
    if edit is not None:
        state = torch.load(dst / "best_model.pt", weights_only=True)
        edit(state)
        torch.save(state, dst / "best_model.pt")
    return dst


def _load_error(ckpt: Path) -> str:
    model = get_model("scgpt", {"checkpoint": str(ckpt)})
    with pytest.raises(UserError) as err:
        model.load()  # type: ignore[attr-defined]
    return str(err.value)


def _draws(cell_id: str, n: int, seed: int = 0) -> np.ndarray:
    """The documented per-cell generator: numpy default_rng seeded with sha256("<seed>:<cell_id>")[:8]."""
    digest = hashlib.sha256(f"{seed}:{cell_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).random(n)


def _expected_bins(values: list[float], draws: np.ndarray, n_bins: int = 51) -> list[int]:
    """scGPT's binning by plain counting: edges = np.quantile (the original's call), then for each value
    the number of edges <= it (left) and < it (right); a tie with edges draws between right+1 and left."""
    edges = [float(e) for e in np.quantile(np.asarray(values, dtype=np.float32), np.linspace(0, 1, n_bins - 1))]
    out = []
    for v, r in zip(values, draws, strict=True):
        left = sum(1 for e in edges if e <= v)
        right = sum(1 for e in edges if e < v)
        out.append(left if left == right else math.ceil(r * (right - left) + left))
    return out


# ------------------------------------------------------------------------------------------- resources / presets


def test_vendored_files_are_the_official_ones(shared_dir: Path) -> None:
    with gzip.open(CENSUS_VOCAB_FILE, "rb") as fh:
        vendored = fh.read()
    official = (shared_dir / "assets/scgpt/default_census_vocab.json").read_bytes()
    assert hashlib.sha256(vendored).digest() == hashlib.sha256(official).digest()
    assert HUMAN_ARGS_FILE.read_bytes() == (shared_dir / "assets/scgpt/scGPT_human_args.json").read_bytes()


def test_human_preset_matches_the_manifest(shared_dir: Path) -> None:
    manifest = json.loads((shared_dir / "assets/manifests/scgpt.json").read_text())
    args = json.loads((shared_dir / "assets/scgpt/scGPT_human_args.json").read_text())
    assert ScGPTModel.presets["human"] == args
    cfg = config_from_args(args)
    mc = manifest["config"]
    names = ["d_model", "nhead", "d_hid", "nlayers", "nlayers_cls", "n_bins", "pad_value", "max_seq_len"]
    names += ["pre_norm", "do_mvc"]
    assert {k: getattr(cfg, k) for k in names} == {k: mc[k] for k in names}
    shapes = official_shapes(cfg, mc["ntoken"])
    official = {k: tuple(v) for k, v in manifest["state_dict_official_names"].items()}
    assert list(shapes) == list(official)  # same keys, same order
    assert shapes == official
    assert sum(math.prod(s) for s in shapes.values()) == manifest["n_parameters"]
    # the module built here (meta device: no memory) holds exactly the encoder keys
    with torch.device("meta"):
        module = ScGPTEncoder(cfg, mc["ntoken"], PAD)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == official_encoder_shapes(cfg, mc["ntoken"])
    tiny = config_from_args(ScGPTModel.presets["tiny"])
    assert (tiny.nlayers, tiny.d_model, tiny.nhead, tiny.d_hid, tiny.n_bins) == (2, 64, 4, 64, 51)
    # the RELEASED file (manifest official_file_keys): no cls_decoder, flag_encoder, FlashMHA Wqkv names
    file_keys = manifest["official_file_keys"]
    assert "NO cls_decoder" in file_keys and "flag_encoder.weight" in file_keys
    released = released_shapes(cfg, mc["ntoken"])
    assert not any(k.startswith("cls_decoder.") for k in released)
    assert released["flag_encoder.weight"] == (2, 512)
    assert {k: v for k, v in released.items() if k != "flag_encoder.weight"} == {
        k: v for k, v in official.items() if not k.startswith("cls_decoder.")}


# ------------------------------------------------------------------------------------------- binning / tokenizer


def test_binning_hand_checked() -> None:
    rng = np.random.default_rng(0)
    # 50 edges over [1, 5, 10]: 1 is edge 0 only (bin 1), 10 the last edge only (bin 50); 5 lies strictly
    # between edge 24 (4.92) and edge 25 (5.08): 25 edges are below it (bin 25)
    assert bin_values(np.array([1, 5, 10], dtype=np.float32), 51, rng).tolist() == [1, 25, 50]
    # zeros stay 0 and do not enter the quantiles
    assert bin_values(np.array([0, 1, 0, 5, 10], dtype=np.float32), 51, rng).tolist() == [0, 1, 0, 25, 50]
    # a row of zeros: zeros, and no random numbers drawn
    state = rng.bit_generator.state
    assert bin_values(np.zeros(4, dtype=np.float32), 51, rng).tolist() == [0, 0, 0, 0]
    assert rng.bit_generator.state == state
    # all equal: every edge is a tie, so each value draws uniformly from 1..50: ceil(50 - 50 r)
    draws = np.random.default_rng(7).random(1000)
    got = bin_values(np.full(1000, 3.0, dtype=np.float32), 51, np.random.default_rng(7))
    assert got.tolist() == [math.ceil(50 - 50 * r) for r in draws]
    assert got.min() >= 1 and got.max() <= 50 and len(set(got.tolist())) == 50


def test_tokenizer_real_cell_hand_checked(real: dict, tiny: tuple) -> None:
    model, _ = tiny
    tok = model.make_tokenizer(real["genes"])
    # 17,999 of the 21,207 symbols are in the census vocabulary (exact, case-sensitive match)
    assert tok.n_matched == 17_999
    assert tok.coverage == pytest.approx(17_999 / 21_207)
    ids, gi, vals = _cells(real, [416])
    assert ids[0] == "CTTAACGCAACA"
    out = tok(ids, gi, vals)
    got_ids, got_vals = out["input_ids"][0], out["values"][0]
    assert got_ids.dtype == np.int32 and got_vals.dtype == np.float32
    # hand-checked: 567 expressed genes, 521 in the vocabulary: <cls> + 521 tokens, <cls> value pad_value -2
    assert len(got_ids) == 522 and got_ids[0] == CLS and got_vals[0] == -2.0
    sym = real["genes"]["symbol"].to_numpy()
    counts = dict(zip(sym[gi[0]], vals[0], strict=True))
    assert [int(i) for i in got_ids[1:4]] == [real["vocab"][g] for g in ("AAMDC", "ABCC2", "ABCC3")]
    bins = dict(zip(got_ids[1:].tolist(), got_vals[1:].tolist(), strict=True))
    by_count: dict[float, set[float]] = {}
    for g, c in counts.items():
        if g in real["vocab"]:
            by_count.setdefault(float(c), set()).add(bins[real["vocab"][g]])
    # 442 of the 521 counts are 1, 52 are 2, 10 are 3: the 50 quantile edges are 1 for k = 0..41 and 2 for
    # k = 42..46, so count-1 genes draw their bin from 1..42 and count-2 genes from 43..47; the single
    # largest count (MT-RNR2, 122) is the top edge alone: bin 50
    assert by_count[1.0] <= set(range(1, 43)) and len(by_count[1.0]) > 30
    assert by_count[2.0] <= set(range(43, 48))
    assert bins[real["vocab"]["MT-RNR2"]] == 50 and counts["MT-RNR2"] == 122

    # the whole cell by an independent plain computation: vocabulary genes in store order, bins by counting
    kept = [(real["vocab"][s], float(c)) for s, c in zip(sym[gi[0]], vals[0], strict=True) if s in real["vocab"]]
    exp_bins = _expected_bins([c for _, c in kept], _draws("CTTAACGCAACA", len(kept)))
    assert got_ids.tolist() == [CLS] + [i for i, _ in kept]
    assert got_vals.tolist() == [-2.0] + [float(b) for b in exp_bins]


def test_tokenizer_samples_long_cells_after_binning(real: dict, tiny: tuple) -> None:
    model, _ = tiny
    tok = model.make_tokenizer(real["genes"])
    ids, gi, vals = _cells(real, [0])
    out = tok(ids, gi, vals)
    got_ids, got_vals = out["input_ids"][0], out["values"][0]
    # CGTTAGCACGTT: 5,167 expressed genes, 4,770 in the vocabulary > 1,199: <cls> + a sample of 1,199
    assert ids[0] == "CGTTAGCACGTT" and model.max_length == 1200
    assert len(got_ids) == 1200 and got_ids[0] == CLS
    sym = real["genes"]["symbol"].to_numpy()
    kept = [(real["vocab"][s], float(c)) for s, c in zip(sym[gi[0]], vals[0], strict=True) if s in real["vocab"]]
    assert len(kept) == 4_770
    # bins come from all 4,770 genes (the collator bins before it samples); then the documented sample:
    # the first 1,199 of a permutation drawn after the binning draws, kept in store order
    gen = np.random.default_rng(int.from_bytes(hashlib.sha256(b"0:CGTTAGCACGTT").digest()[:8], "little"))
    exp_bins = _expected_bins([c for _, c in kept], gen.random(len(kept)))
    chosen = sorted(gen.permutation(len(kept))[:1199].tolist())
    assert got_ids[1:].tolist() == [kept[i][0] for i in chosen]
    assert got_vals[1:].tolist() == [float(exp_bins[i]) for i in chosen]
    assert got_vals[1:].min() >= 1 and got_vals[1:].max() <= 50
    # a shorter max_length option samples fewer genes
    short = get_model("scgpt", {"checkpoint": str(model.checkpoint_dir()), "max_length": 100})
    assert len(short.make_tokenizer(real["genes"])(ids, gi, vals)["input_ids"][0]) == 100  # type: ignore[attr-defined]


def test_tokenizer_deterministic_batch_independent_and_normalize_invariant(real: dict, tiny: tuple) -> None:
    model, _ = tiny
    tok = model.make_tokenizer(real["genes"])
    rows = [0, 416, 424, 4030, 7]  # 4030 has no expressed gene at all
    batch = tok(*_cells(real, rows))
    for j, r in enumerate(rows):
        alone = tok(*_cells(real, [r]))
        assert np.array_equal(alone["input_ids"][0], batch["input_ids"][j])
        assert np.array_equal(alone["values"][0], batch["values"][j])
    assert batch["input_ids"][3].tolist() == [CLS] and batch["values"][3].tolist() == [-2.0]
    # normalize_total + log1p keeps each cell's value order, so the bins (and the draws) are the same
    log1p = get_model("scgpt", {"checkpoint": str(model.checkpoint_dir()), "normalize": "log1p"})
    lb = log1p.make_tokenizer(real["genes"])(*_cells(real, rows))  # type: ignore[attr-defined]
    for j in range(len(rows)):
        assert np.array_equal(lb["input_ids"][j], batch["input_ids"][j])
        assert np.array_equal(lb["values"][j], batch["values"][j])
    # another seed draws other tie bins and another sample
    other = get_model("scgpt", {"checkpoint": str(model.checkpoint_dir()), "seed": 1})
    ob = other.make_tokenizer(real["genes"])(*_cells(real, rows))  # type: ignore[attr-defined]
    assert not np.array_equal(ob["values"][1], batch["values"][1])
    assert not np.array_equal(ob["input_ids"][0], batch["input_ids"][0])


def test_tokenizer_duplicates_specials_and_coverage(tiny: tuple) -> None:
    model, _ = tiny
    genes = pd.DataFrame(
        {
            "position": np.arange(5, dtype=np.int32),
            "symbol": ["A2M", "<cls>", "NOT_A_GENE", "A2M", None],  # A2M twice: both columns count
            "ensembl_id": [None] * 5,
        }
    )
    tok = model.make_tokenizer(genes)
    assert tok.coverage == pytest.approx(2 / 5)
    out = tok(np.array(["c"]), [np.arange(5, dtype=np.int32)], [np.array([3, 5, 1, 7, 2], dtype=np.float32)])
    with gzip.open(CENSUS_VOCAB_FILE) as fh:
        a2m = json.load(fh)["A2M"]
    assert out["input_ids"][0].tolist() == [CLS, a2m, a2m]
    assert out["values"][0].tolist() == [-2.0, 1.0, 50.0]  # 3 -> edge 0 alone, 7 -> the top edge alone

    mouse = pd.DataFrame({"position": [0, 1, 2], "symbol": ["Actb", "Gapdh", "Cd74"], "ensembl_id": [None] * 3})
    with pytest.raises(UserError, match="human gene symbols"):
        model.make_tokenizer(mouse)


def test_bad_options_are_user_errors(tiny_dir: Path) -> None:
    for opts, word in (
        ({"normalize": "zscore"}, "normalize"),
        ({"max_length": 1}, "max_length"),
        ({"l2_normalize": "yes"}, "l2_normalize"),
        ({"seed": 1.5}, "seed"),
        ({"pooling": "mean"}, "no option"),
    ):
        with pytest.raises(UserError, match=word):
            get_model("scgpt", {"checkpoint": str(tiny_dir), **opts})


# ------------------------------------------------------------------------------------------- checkpoint


def test_init_random_writes_the_official_files(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(
        ["best_model.pt", "args.json", "vocab.json", RANDOM_WEIGHTS_MARKER]
    )
    marker = json.loads((tiny_dir / RANDOM_WEIGHTS_MARKER).read_text())
    assert marker == {"model": "scgpt", "preset": "tiny", "note": "random weights, not pretrained"}
    assert json.loads((tiny_dir / "args.json").read_text()) == ScGPTModel.presets["tiny"]
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    assert len(vocab) == N_VOCAB + 3
    assert (vocab["<pad>"], vocab["<cls>"], vocab["<eoc>"]) == (60_694, 60_695, 60_696)
    state = torch.load(tiny_dir / "best_model.pt", weights_only=True)
    assert isinstance(state, dict)  # a plain state dict, flash-attn key names
    expected = released_shapes(config_from_args(ScGPTModel.presets["tiny"]), N_VOCAB + 3)
    assert list(state) == list(expected)  # the released key set: what users download loads in every test
    assert "flag_encoder.weight" in state and not any(k.startswith("cls_decoder.") for k in state)
    assert "transformer_encoder.layers.1.self_attn.Wqkv.weight" in state
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_strict_loading(tiny_dir: Path, tiny: tuple, tmp_path: Path) -> None:
    _, module = tiny
    assert not module.training

    key = "transformer_encoder.layers.1.linear1.weight"
    msg = _load_error(_copy_ckpt(tiny_dir, tmp_path / "missing", lambda s: s.pop(key)))
    assert key in msg and "missing" in msg

    def add(s: dict) -> None:  # a layer the args.json does not have: not a head, so an error
        s["transformer_encoder.layers.2.linear1.weight"] = torch.zeros(64, 64)

    msg = _load_error(_copy_ckpt(tiny_dir, tmp_path / "extra", add))
    assert "unexpected" in msg and "transformer_encoder.layers.2.linear1.weight" in msg

    def reshape(s: dict) -> None:
        s["value_encoder.linear2.weight"] = torch.zeros(64, 65)

    msg = _load_error(_copy_ckpt(tiny_dir, tmp_path / "shape", reshape))
    assert "value_encoder.linear2.weight" in msg and "(64, 65)" in msg

    def vocab_rows(s: dict) -> None:
        s["encoder.embedding.weight"] = s["encoder.embedding.weight"][:-1]

    assert "60697 tokens" in _load_error(_copy_ckpt(tiny_dir, tmp_path / "rows", vocab_rows))

    deeper = _copy_ckpt(tiny_dir, tmp_path / "depth")  # args.json says 3 layers, the weights have 2
    args = json.loads((deeper / "args.json").read_text())
    (deeper / "args.json").write_text(json.dumps({**args, "nlayers": 3}))
    assert "transformer_encoder.layers.2." in _load_error(deeper)

    category = _copy_ckpt(tiny_dir, tmp_path / "category")
    (category / "args.json").write_text(json.dumps({**args, "input_emb_style": "category"}))
    assert "input_emb_style" in _load_error(category)


def test_released_file_loads_and_names_what_it_skips(tiny_dir: Path, tiny: tuple, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The released key set (init_random writes it) loads; the heads are skipped and named in ONE log line;
    without any head (an encoder-only file) it loads too; a missing encoder tensor is still an error."""
    import logging

    _, module = tiny
    with caplog.at_level(logging.INFO, logger="scdrugmap_ray.engine.models.checkpoint"):
        get_model("scgpt", {"checkpoint": str(tiny_dir)}).load()  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1
    heads = ("flag_encoder.weight", "decoder.fc.*.weight (x3)", "mvc_decoder.gene2query.weight", "mvc_decoder.W.weight")
    for name in heads:
        assert name in lines[0]
    assert "skipped 10 tensor(s)" in lines[0]

    def heads_only_encoder(s: dict) -> None:
        for k in [k for k in s if k.split(".")[0] in ("flag_encoder", "decoder", "mvc_decoder")]:
            s.pop(k)

    bare = get_model("scgpt", {"checkpoint": str(_copy_ckpt(tiny_dir, tmp_path / "bare", heads_only_encoder))}).load()  # type: ignore[attr-defined]
    for (name, a), (_, b) in zip(module.state_dict().items(), bare.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    def impl(s: dict) -> None:  # newer scGPT: the flash-attn module wrapped as self_attn._impl
        for k in [k for k in s if ".self_attn." in k]:
            s[k.replace(".self_attn.", ".self_attn._impl.")] = s.pop(k)

    wrapped = get_model("scgpt", {"checkpoint": str(_copy_ckpt(tiny_dir, tmp_path / "impl", impl))}).load()  # type: ignore[attr-defined]
    for (name, a), (_, b) in zip(module.state_dict().items(), wrapped.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    def fine_tuned(s: dict) -> None:  # a file saved from TransformerModel as embed_data builds it: cls_decoder too
        cfg = config_from_args(ScGPTModel.presets["tiny"])
        s.pop("flag_encoder.weight")
        for k, shape in official_shapes(cfg, N_VOCAB + 3).items():
            s.setdefault(k, torch.zeros(shape))

    get_model("scgpt", {"checkpoint": str(_copy_ckpt(tiny_dir, tmp_path / "ft", fine_tuned))}).load()  # type: ignore[attr-defined]


def test_renamed_keys_and_other_classifier_sizes_load(tiny_dir: Path, tiny: tuple, tmp_path: Path) -> None:
    _, module = tiny

    def rename(s: dict) -> None:  # what scGPT's load_pretrained does for torch's MultiheadAttention
        for k in [k for k in s if ".Wqkv." in k]:
            s[k.replace("Wqkv.", "in_proj_")] = s.pop(k)

    renamed = _copy_ckpt(tiny_dir, tmp_path / "renamed", rename)
    other = get_model("scgpt", {"checkpoint": str(renamed)}).load()  # type: ignore[attr-defined]
    for (name, a), (_, b) in zip(module.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    def both(s: dict) -> None:
        s["transformer_encoder.layers.0.self_attn.in_proj_bias"] = s["transformer_encoder.layers.0.self_attn.Wqkv.bias"]

    assert "two names" in _load_error(_copy_ckpt(tiny_dir, tmp_path / "both", both))

    def classes(s: dict) -> None:  # a fine-tuned classifier head of 7 cell types: not used, accepted
        s["cls_decoder.out_layer.weight"] = torch.zeros(7, 64)
        s["cls_decoder.out_layer.bias"] = torch.zeros(7)

    get_model("scgpt", {"checkpoint": str(_copy_ckpt(tiny_dir, tmp_path / "cls7", classes))}).load()  # type: ignore[attr-defined]


def test_truncated_and_wrong_checkpoints(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / "best_model.pt").read_bytes()
    for name, cut in (("head", 1000), ("tail", len(data) - 100)):
        bad = _copy_ckpt(tiny_dir, tmp_path / name)
        (bad / "best_model.pt").write_bytes(data[:cut])
        assert "truncated or corrupt checkpoint file" in _load_error(bad)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    msg = _load_error(hf)
    assert "best_model.pt" in msg and "args.json" in msg and "vocab.json" in msg and "config.json" in msg

    nested = _copy_ckpt(tiny_dir, tmp_path / "nested")
    torch.save({"model_state_dict": {"a": torch.zeros(1)}, "epoch": 3}, nested / "best_model.pt")
    assert "plain state dict" in _load_error(nested)

    unsafe = _copy_ckpt(tiny_dir, tmp_path / "unsafe", lambda s: s.update(path=pathlib.PurePosixPath("x")))
    assert "cannot be loaded safely" in _load_error(unsafe)

    badvocab = _copy_ckpt(tiny_dir, tmp_path / "badvocab")
    (badvocab / "vocab.json").write_text(json.dumps({"A": 0, "B": 2}))
    assert "consecutive" in _load_error(badvocab)


# ------------------------------------------------------------------------------------------- embedding


class _Reference(nn.Module):
    """The original's non-flash encoder from torch built-ins: nn.TransformerEncoder of
    nn.TransformerEncoderLayer(d, nhead, d_hid, dropout, batch_first=True) loaded with the names scGPT's
    loader gives (Wqkv -> in_proj_), gene and value encoders in plain ops, src_key_padding_mask = ids == <pad>."""

    def __init__(self, state: dict[str, torch.Tensor], args: dict) -> None:
        super().__init__()
        d, heads, hid = args["embsize"], args["nheads"], args["d_hid"]
        layer = nn.TransformerEncoderLayer(d, heads, hid, args["dropout"], batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, args["nlayers"], enable_nested_tensor=False)
        self.s = state
        enc = {
            k[len("transformer_encoder.") :].replace("Wqkv.", "in_proj_"): v
            for k, v in state.items()
            if k.startswith("transformer_encoder.")
        }
        self.transformer_encoder.load_state_dict(enc, strict=True)
        self.eval()

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        s, d = self.s, self.s["encoder.enc_norm.weight"].shape[0]
        g = nn.functional.embedding(ids, s["encoder.embedding.weight"])
        g = nn.functional.layer_norm(g, (d,), s["encoder.enc_norm.weight"], s["encoder.enc_norm.bias"])
        x = values.unsqueeze(-1).clamp(max=512)
        x = torch.relu(x @ s["value_encoder.linear1.weight"].T + s["value_encoder.linear1.bias"])
        x = x @ s["value_encoder.linear2.weight"].T + s["value_encoder.linear2.bias"]
        x = nn.functional.layer_norm(x, (d,), s["value_encoder.norm.weight"], s["value_encoder.norm.bias"])
        out = self.transformer_encoder(g + x, src_key_padding_mask=ids.eq(PAD))
        return out[:, 0, :]


def test_embedding_matches_torch_reference_and_is_batch_independent(real: dict, tiny: tuple, tiny_dir: Path) -> None:
    model, module = tiny
    tok = model.make_tokenizer(real["genes"])
    rows = [416, 424, 4030, 384]  # 522, ~700, 1 (<cls> alone) and ~830 tokens: batches pad differently
    out = tok(*_cells(real, rows))
    with torch.inference_mode():
        batch = model.embed(module, model.collate(out))
        alone = model.embed(module, model.collate({k: v[1:2] for k, v in out.items()}))
        padded = model.embed(module, model.collate({k: v[1:2] for k, v in out.items()}, pad_to=1200))
    assert batch.shape == (4, 64) and batch.dtype == torch.float32
    np.testing.assert_allclose(alone[0].numpy(), batch[1].numpy(), atol=1e-5)
    np.testing.assert_allclose(padded[0].numpy(), batch[1].numpy(), atol=1e-5)
    # L2-normalised, as get_batch_cell_embeddings ends
    np.testing.assert_allclose(batch.norm(dim=1).numpy(), 1.0, rtol=1e-6)

    state = torch.load(tiny_dir / "best_model.pt", weights_only=True)
    ref = _Reference(state, ScGPTModel.presets["tiny"])
    raw_model = get_model("scgpt", {"checkpoint": str(tiny_dir), "l2_normalize": False})
    coll = model.collate(out)
    with torch.inference_mode():
        expect = ref(coll["input_ids"], coll["values"])
        raw = raw_model.embed(module, coll)  # type: ignore[attr-defined]
    np.testing.assert_allclose(raw.numpy(), expect.numpy(), atol=1e-5)
    np.testing.assert_allclose(batch.numpy(), (expect / expect.norm(dim=1, keepdim=True)).numpy(), atol=1e-5)


def test_pre_norm_scheme(tmp_path: Path) -> None:
    """scGPT's 'pre' scheme normalises the stream itself: x = norm1(x); x += attn(x); x = norm2(x); x += ff(x)."""
    ckpt = ScGPTModel.init_random(tmp_path / "pre", "tiny", {"pre_norm": True, "nlayers": 1})
    model = get_model("scgpt", {"checkpoint": str(ckpt), "l2_normalize": False})
    module = model.load()  # type: ignore[attr-defined]
    s = torch.load(ckpt / "best_model.pt", weights_only=True)
    rows = {
        "input_ids": [np.array([CLS, 5, 9, 11], dtype=np.int32)],
        "values": [np.array([-2, 1, 3, 50], dtype=np.float32)],
    }
    batch = model.collate(rows)  # type: ignore[attr-defined]
    attn = nn.MultiheadAttention(64, 4, batch_first=True)
    p = "transformer_encoder.layers.0."
    attn.load_state_dict(
        {
            "in_proj_weight": s[p + "self_attn.Wqkv.weight"],
            "in_proj_bias": s[p + "self_attn.Wqkv.bias"],
            "out_proj.weight": s[p + "self_attn.out_proj.weight"],
            "out_proj.bias": s[p + "self_attn.out_proj.bias"],
        }
    )
    attn.eval()
    with torch.inference_mode():
        x = module.encoder(batch["input_ids"]) + module.value_encoder(batch["values"])

        def ln(t: torch.Tensor, n: str) -> torch.Tensor:
            return nn.functional.layer_norm(t, (64,), s[p + n + ".weight"], s[p + n + ".bias"])

        x = ln(x, "norm1")
        x = x + attn(x, x, x, need_weights=False)[0]
        x = ln(x, "norm2")
        ff = torch.relu(x @ s[p + "linear1.weight"].T + s[p + "linear1.bias"]) @ s[p + "linear2.weight"].T
        x = x + ff + s[p + "linear2.bias"]
        got = model.embed(module, batch)  # type: ignore[attr-defined]
    np.testing.assert_allclose(got.numpy(), x[:, 0].numpy(), atol=1e-5)


def test_bf16_module(tiny: tuple, real: dict) -> None:
    model, module = tiny
    half = model.load(dtype=torch.bfloat16)
    out = model.make_tokenizer(real["genes"])(*_cells(real, [416, 424]))
    with torch.inference_mode():
        a = model.embed(module, model.collate(out))
        b = model.embed(half, model.collate(out))
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.99


# ------------------------------------------------------------------------------------------- upstream parity


def _upstream_scgpt(draws: list[np.random.Generator]) -> SimpleNamespace:
    """scGPT 0.2.4's OWN code from the installed wheel (``pip install --no-deps scgpt==0.2.4``, see
    pyproject.toml's dev extra): ``scgpt/model/model.py`` imported as a module, and ``binning`` / ``_digitize``
    (``scgpt/preprocess.py``), ``DataCollator`` (``scgpt/data_collator.py``) and ``load_pretrained``
    (``scgpt/utils/util.py``) run from their source. The package's ``__init__`` and those modules' other
    imports (torchtext, scanpy, scvi-tools, cell-gears, IPython) cannot be installed beside torch 2.13, so
    bare parent packages stand in for ``scgpt`` and only the named definitions are executed. ``np.random.rand``
    (``_digitize``'s tie draws, one call per cell) hands out each cell's own generator in turn, so the
    original's random choices are the ones this package makes."""
    import ast
    import dataclasses
    import importlib
    import importlib.metadata
    import importlib.util
    import logging
    import sys
    import types
    import typing

    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scgpt 0.2.4 is not installed: pip install --no-deps scgpt==0.2.4 "
                    "(tools/install.sh --dev, i.e. make install, does it)")
    assert importlib.metadata.version("scgpt") == "0.2.4"
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("_scgpt_upstream", root), ("_scgpt_upstream.model", root / "model")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    model_module = importlib.import_module("_scgpt_upstream.model.model")

    queue = iter(draws)
    proxy = types.ModuleType("numpy_with_cell_draws")
    proxy.__dict__["__getattr__"] = lambda name: getattr(np, name)
    proxy.random = SimpleNamespace(rand=lambda n: next(queue).random(n))  # type: ignore[attr-defined]
    ns: dict = {"np": proxy, "torch": torch, "logger": logging.getLogger("scGPT"), "dataclass": dataclasses.dataclass}
    ns.update({k: getattr(typing, k) for k in ("Any", "Dict", "List", "Mapping", "Optional", "Tuple", "Union")})
    for rel, names in (("preprocess.py", {"_digitize", "binning"}), ("data_collator.py", {"DataCollator"}),
                       ("utils/util.py", {"load_pretrained"})):
        tree = ast.parse((root / rel).read_text())
        body = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]
        assert {n.name for n in body} == names, rel
        exec(compile(ast.Module(body=body, type_ignores=[]), str(root / rel), "exec"), ns)
    return SimpleNamespace(TransformerModel=model_module.TransformerModel, collator=ns["DataCollator"],
                           load_pretrained=ns["load_pretrained"])


def test_parity_with_upstream_scgpt(real: dict, tiny_dir: Path) -> None:
    """The same random weights (the RELEASED key set, written by init_random) and the same real GSE149383
    cells through scGPT 0.2.4's own code, as ``scgpt/tasks/cell_emb.py`` ``get_batch_cell_embeddings`` runs
    it (lines 60-145: <cls> + non-zero vocabulary genes, DataCollator binning with keep_first_n_tokens=1,
    TransformerModel built as at lines 237-257, ``load_pretrained`` at line 258, ``_encode`` [:, 0], L2
    norm): identical bins and input ids, embeddings equal to float32 rounding. Cells of 347-1,078 genes:
    under max_length 1,200 (embed_data's default), so none is subsampled (the original's subsampling draws
    from torch's global generator, this package's from the cell's own)."""
    rows = [384, 416, 424, 467, 524, 525]
    ids, gi, vals = _cells(real, rows)
    model = get_model("scgpt", {"checkpoint": str(tiny_dir)})
    tok = model.make_tokenizer(real["genes"])  # type: ignore[attr-defined]
    ours = tok(ids, gi, vals)
    cfg, vocab = model.checkpoint_meta()  # type: ignore[attr-defined]
    up = _upstream_scgpt([cell_rng(str(c)) for c in ids])

    # embed_data: the data's symbols in the vocabulary, each cell's non-zero values, <cls> first
    examples = []
    for g, v in zip(gi, vals, strict=True):
        sym = [real["symbols"][i] for i in g]
        keep = [i for i, s in enumerate(sym) if s in vocab]
        genes = np.insert(np.array([vocab[sym[i]] for i in keep]), 0, vocab["<cls>"])
        values = np.insert(v[keep], 0, cfg.pad_value)
        examples.append({"genes": torch.from_numpy(genes).long(), "expressions": torch.from_numpy(values).float()})
    collator = up.collator(do_padding=True, pad_token_id=vocab["<pad>"], pad_value=cfg.pad_value, do_mlm=False,
                           do_binning=True, max_length=1200, sampling=True, keep_first_n_tokens=1)
    batch = collator(examples)
    for i in range(len(rows)):
        n = len(ours["input_ids"][i])
        assert batch["gene"][i, :n].tolist() == ours["input_ids"][i].tolist()
        assert batch["expr"][i, :n].tolist() == ours["values"][i].tolist()  # same bins, tie draws included
        assert (batch["gene"][i, n:] == vocab["<pad>"]).all()

    args = json.loads((tiny_dir / "args.json").read_text())
    original = up.TransformerModel(
        ntoken=len(vocab), d_model=args["embsize"], nhead=args["nheads"], d_hid=args["d_hid"], nlayers=args["nlayers"],
        nlayers_cls=args["n_layers_cls"], n_cls=1, vocab=vocab, dropout=args["dropout"], pad_token=args["pad_token"],
        pad_value=args["pad_value"], do_mvc=True, do_dab=False, use_batch_labels=False, domain_spec_batchnorm=False,
        explicit_zero_prob=False, use_fast_transformer=False, fast_transformer_backend="flash", pre_norm=False,
    )
    released = torch.load(tiny_dir / "best_model.pt", weights_only=True)
    up.load_pretrained(original, released, verbose=False)
    original.eval()
    # what the original's non-strict loader did with the released file: every encoder tensor taken over
    for k, v in model.load().state_dict().items():  # type: ignore[attr-defined]
        assert torch.equal(original.state_dict()[k.replace("Wqkv.", "in_proj_")], v), k
    with torch.no_grad():
        hidden = original._encode(batch["gene"], batch["expr"], src_key_padding_mask=batch["gene"].eq(vocab["<pad>"]))
    want = hidden[:, 0, :].numpy()
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    with torch.inference_mode():
        got = model.embed(model.load(), model.collate(ours))  # type: ignore[attr-defined]
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)
