"""UCE: cell sentences on real cells (structure, sampling law, parity with the reference package's
``sample_cell_sentences``), strict loading of the official files, the embedding against the reference
``uce.model.TransformerModel`` loaded with the same random weights, batch independence, presets against
the manifest, LoRA targets.

Stand-in assets (the real protein embeddings, offsets and chromosome table are not obtainable here) are
written by ``UCE.init_random`` in the official formats: random protein embeddings for a shuffled subset of
the PC9 store's gene symbols, random chromosomes and unique random starts.
"""

from __future__ import annotations

import json
import math
import pickle
import runpy
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from realcells import cells as _cells
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import RANDOM_WEIGHTS_MARKER, get_model
from scdrugmap_ray.engine.models.uce import (
    CHROM_SEED,
    DEFAULT_ARGS,
    STANDIN_OFFSET,
    UCE,
    UCEModel,
    cell_seed,
    official_shapes,
)
from torch import nn

N_STANDIN = 5_000  # stand-in protein embeddings for this many of the store's symbols
TINY = UCE.presets["tiny"]

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def standin_genes(pc9: dict) -> list[str]:
    symbols = list({s.upper(): s for s in reversed(pc9["symbols"])}.values())[::-1]  # unique when upper-cased
    rng = np.random.default_rng(7)
    return [symbols[i] for i in rng.permutation(len(symbols))[:N_STANDIN]]  # token order != store order


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, standin_genes: list[str]) -> Path:
    return UCE.init_random(tmp_path_factory.mktemp("uce") / "tiny", "tiny", {"genes": standin_genes})


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path, pc9: dict) -> tuple[UCE, UCEModel, object]:
    model = get_model("uce", {"checkpoint": str(tiny_dir)})
    assert isinstance(model, UCE)
    return model, model.load(), model.make_tokenizer(pc9["genes"])


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _load_error(ckpt: Path, what: str = "load", **options: object) -> str:
    model = get_model("uce", {"checkpoint": str(ckpt), **options})
    with pytest.raises(UserError) as err:
        model.load() if what == "load" else model.make_tokenizer(  # type: ignore[attr-defined]
            pd.DataFrame({"position": [0], "symbol": ["A"], "ensembl_id": [None]})
        )
    return str(err.value)


def _first_symbol(ckpt: Path) -> str:
    return str(pd.read_csv(ckpt / "species_chrom.csv", nrows=1)["gene_symbol"][0])


def _chrom_codes(tiny_dir: Path) -> dict[str, tuple[int, int]]:
    """symbol -> (chromosome code, start), computed independently from the csv (sorted 'human_<chrom>')."""
    df = pd.read_csv(tiny_dir / "species_chrom.csv", dtype={"chromosome": str})
    cats = sorted(set("human_" + df["chromosome"]))
    rows = zip(df["gene_symbol"], df["chromosome"], df["start"], strict=True)
    return {s: (cats.index("human_" + c), int(st)) for s, c, st in rows}


# ------------------------------------------------------------------------------------------- tokenizer


def test_sentence_structure_on_real_cells(pc9: dict, tiny: tuple, tiny_dir: Path, standin_genes: list[str]) -> None:
    model, _, tok = tiny
    # matched case-insensitively, as the original (upper-cased symbols): one more store gene than stand-ins
    upper = {g.upper() for g in standin_genes}
    n_match = sum(s.upper() in upper for s in pc9["symbols"])
    assert n_match >= N_STANDIN
    assert tok.n_matched == n_match and tok.coverage == pytest.approx(n_match / 21_207)
    token_of = {g.upper(): i + STANDIN_OFFSET for i, g in enumerate(standin_genes)}
    pos_of = {token_of[s.upper()]: v for s, v in _chrom_codes(tiny_dir).items()}
    offset = json.loads((tiny_dir / "uce_args.json").read_text())["CHROM_TOKEN_OFFSET"]
    assert offset == STANDIN_OFFSET + N_STANDIN
    rows = [0, 1, 57, 300]
    ids, gi, vals = _cells(pc9, rows)
    out = tok(ids, gi, vals)
    for k, sent in enumerate(out["input_ids"]):
        assert sent.dtype == np.int32 and sent[0] == DEFAULT_ARGS["cls_token_idx"]
        expressed = {token_of[pc9["symbols"][g].upper()] for g in gi[k] if pc9["symbols"][g].upper() in token_of}
        i, seen, n_genes = 1, [], 0
        while i < len(sent):
            chrom = int(sent[i]) - offset
            assert 0 <= chrom < 25 and chrom not in seen
            seen.append(chrom)
            end = i + 1 + list(sent[i + 1 :]).index(DEFAULT_ARGS["chrom_token_right_idx"])
            block = sent[i + 1 : end]
            assert len(block) > 0 and set(block.tolist()) <= expressed
            assert all(pos_of[t][0] == chrom for t in block.tolist())
            starts = [pos_of[t][1] for t in block.tolist()]
            assert starts == sorted(starts)
            n_genes += len(block)
            i = end + 1
        assert n_genes == 1024 and len(sent) == 1 + 1024 + 2 * len(seen) <= model.max_length
        assert seen != sorted(seen)  # chromosome order is shuffled
    # seeded per cell: the same cell gives the same sentence in any batch; another id, another draw
    alone = tok(ids[2:3], gi[2:3], vals[2:3])["input_ids"][0]
    np.testing.assert_array_equal(alone, out["input_ids"][2])
    other = tok(np.array(["another-id"]), gi[2:3], vals[2:3])["input_ids"][0]
    assert not np.array_equal(other, alone)


def test_sampling_law_is_log1p_counts(tiny: tuple, standin_genes: list[str]) -> None:
    genes = pd.DataFrame({"position": [0, 1, 2, 3], "symbol": [*standin_genes[:3], "NOT_A_GENE"], "ensembl_id": None})
    model = tiny[0]
    tok = model.make_tokenizer(genes)
    assert tok.coverage == 0.75
    counts = np.array([1, 9, 99, 50], dtype=np.float32)
    n = 40
    out = tok(np.array([f"c{i}" for i in range(n)]), [np.arange(4, dtype=np.int32)] * n, [counts] * n)
    tokens = np.concatenate(out["input_ids"])
    freq = np.array([(tokens == STANDIN_OFFSET + i).sum() for i in range(3)]) / (n * 1024)
    expect = np.log1p(counts[:3]) / np.log1p(counts[:3]).sum()  # 0.092, 0.305, 0.610
    np.testing.assert_allclose(freq, expect, atol=0.01)  # sd of each frequency is below 0.003
    # counts are read as integers (the original's int64 memmap): 0.5 -> 0, never drawn; no counts -> [CLS]
    two = [np.array([0, 1], dtype=np.int32)] * 2
    out = tok(np.array(["x", "y"]), two, [np.array([0.5, 3.0]), np.array([0.4, 0.2])])
    assert set(out["input_ids"][0].tolist()) == {3, STANDIN_OFFSET + 1, 2} | {int(out["input_ids"][0][1])}
    assert out["input_ids"][1].tolist() == [DEFAULT_ARGS["cls_token_idx"]]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the reference indexes a Series by position
def test_sentence_matches_reference_sample_cell_sentences(pc9: dict, tiny: tuple, tiny_dir: Path) -> None:
    """The reference's sentence builder, fed the reference's own gene tables and numpy's global generator
    seeded with our per-cell seed, gives exactly our sentence (stand-in starts are unique, so no ties)."""
    data_utils = pytest.importorskip("uce.data_proc.data_utils")
    import anndata as ad
    from uce.eval_data import sample_cell_sentences

    _, _, tok = tiny
    symbols = [s.upper() for s in torch.load(tiny_dir / "protein_embeddings" / UCE_HUMAN, weights_only=True)]
    kept = np.flatnonzero(tok.token >= 0)  # the original subsets the data to genes with embeddings
    adata = ad.AnnData(var=pd.DataFrame(index=[pc9["symbols"][g] for g in kept]))
    table = data_utils.get_spec_chrom_csv(str(tiny_dir / "species_chrom.csv"))
    pe_idx, chroms, starts = data_utils.adata_path_to_prot_chrom_starts(adata, "human", symbols, table, STANDIN_OFFSET)
    np.testing.assert_array_equal(pe_idx.numpy(), tok.token[kept])
    np.testing.assert_array_equal(np.asarray(chroms), tok.chrom[kept])
    args = types.SimpleNamespace(**{k: v for k, v in DEFAULT_ARGS.items() if k != "nhead"})
    args.CHROM_TOKEN_OFFSET = STANDIN_OFFSET + N_STANDIN
    col = {g: j for j, g in enumerate(kept)}
    ids, gi, vals = _cells(pc9, [0, 5, 99])
    ours = tok(ids, gi, vals)["input_ids"]
    for k in range(3):
        counts = np.zeros((1, len(kept)))
        for g, v in zip(gi[k], vals[k], strict=True):
            if g in col:
                counts[0, col[g]] = v
        weights = torch.from_numpy(np.log1p(counts))
        np.random.seed(cell_seed(str(ids[k])))
        sent, mask, length, _ = sample_cell_sentences(
            torch.from_numpy(counts), weights, "d", args, {"d": pe_idx}, {"d": chroms}, {"d": starts}
        )
        np.testing.assert_array_equal(sent[0, :length].numpy(), ours[k])
        assert sent.shape[1] == 1536 and int(mask.sum()) == length == len(ours[k])


UCE_HUMAN = "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"


# ------------------------------------------------------------------------------------------- checkpoint


def test_init_random_writes_the_official_layout(tiny_dir: Path, standin_genes: list[str]) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(
        [RANDOM_WEIGHTS_MARKER, "all_tokens.torch", "protein_embeddings", "species_chrom.csv",
         "species_offsets.pkl", "tiny_model.torch", "uce_args.json"]
    )
    state = torch.load(tiny_dir / "tiny_model.torch", weights_only=True)
    n_tokens = STANDIN_OFFSET + N_STANDIN + 25
    cfg = {**TINY, "n_tokens": n_tokens, "pad_length": 1536}
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(cfg)
    proteins = torch.load(tiny_dir / "protein_embeddings" / UCE_HUMAN, weights_only=True)
    assert list(proteins) == standin_genes
    pe = state["pe_embedding.weight"]
    torch.testing.assert_close(proteins[standin_genes[10]], pe[STANDIN_OFFSET + 10])
    with open(tiny_dir / "species_offsets.pkl", "rb") as fh:  # our own file, written by init_random
        assert pickle.load(fh) == {"human": STANDIN_OFFSET}
    tokens = torch.load(tiny_dir / "all_tokens.torch", weights_only=True)
    torch.testing.assert_close(tokens, pe[: n_tokens - 25])
    # chromosome rows as the original's get_ESM2_embeddings draws them (global seed 23)
    torch.manual_seed(CHROM_SEED)
    torch.testing.assert_close(pe[n_tokens - 25 :], torch.normal(mean=0, std=1, size=(25, TINY["token_dim"])))


@pytest.mark.parametrize("variant,preset", [("4-layer", "4layer"), ("33-layer", "33layer")])
def test_real_presets_match_the_manifest(shared_dir: Path, variant: str, preset: str) -> None:
    manifest = json.loads((shared_dir / "assets/manifests/uce.json").read_text())["variants"][variant]
    p = UCE.presets[preset]
    cfg = {**p, "pad_length": 1536}
    shapes = official_shapes(cfg)
    assert shapes == {k: tuple(v) for k, v in manifest["state_dict"].items()}
    assert list(shapes) == list(manifest["state_dict"])
    with torch.device("meta"):
        module = UCEModel(cfg)
    names = {k.replace("in_proj.", "in_proj_"): tuple(v.shape) for k, v in module.state_dict().items()}
    assert list(names) == list(shapes) and names == shapes
    without_pe = sum(math.prod(s) for k, s in shapes.items() if k != "pe_embedding.weight")
    assert without_pe == manifest["n_parameters_without_pe"]


def test_strict_loading(tiny_dir: Path, tmp_path: Path) -> None:
    model_file = "tiny_model.torch"

    def edit(name: str, fn) -> Path:  # type: ignore[no-untyped-def]
        d = _copy(tiny_dir, tmp_path / name)
        state = torch.load(d / model_file, weights_only=True)
        fn(state)
        torch.save(state, d / model_file)
        return d

    key = "transformer_encoder.layers.1.linear2.weight"
    msg = _load_error(edit("missing", lambda s: s.pop(key)))
    assert "missing keys" in msg and key in msg
    msg = _load_error(edit("extra", lambda s: s.update({"decoder.9.weight": torch.zeros(2)})))
    assert "unexpected keys" in msg and "decoder.9.weight" in msg
    msg = _load_error(edit("shape", lambda s: s.update({"encoder.2.weight": torch.zeros(63)})))
    assert "encoder.2.weight" in msg and "(63,)" in msg
    layer0 = "transformer_encoder.layers.0."
    msg = _load_error(edit("layer", lambda s: [s.pop(k) for k in list(s) if k.startswith(layer0)]))
    assert "transformer_encoder.layers.0." in msg
    # the binary decoder (pretraining loss only) is skipped when there and not needed when absent (issue 15)
    unused = ("binary_decoder.", "gene_embedding_layer.")
    get_model("uce", {"checkpoint": str(edit("no_heads", lambda s: [s.pop(k) for k in list(s)
                                                                     if k.startswith(unused)]))}).load()  # type: ignore[attr-defined]

    d = _copy(tiny_dir, tmp_path / "truncated")
    data = (d / model_file).read_bytes()
    (d / model_file).write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _load_error(d)
    (d / model_file).unlink()
    assert "no UCE model file" in _load_error(d) and "4layer_model.torch" in _load_error(d)

    # the official name is found first; heads that do not divide d_model are refused
    d = _copy(tiny_dir, tmp_path / "official")
    (d / model_file).rename(d / "4layer_model.torch")
    get_model("uce", {"checkpoint": str(d)}).load()  # type: ignore[attr-defined]
    (d / "uce_args.json").write_text(json.dumps({"nhead": 5, "CHROM_TOKEN_OFFSET": 15004}))
    assert "not divisible" in _load_error(d)


def test_assets_are_read_safely(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "pkl")
    # a pickle with any global is refused, never unpickled
    (d / "species_offsets.pkl").write_bytes(pickle.dumps({"human": np.int64(4)}))
    assert "not unpickled" in _load_error(d, "tok") and "species_offsets.json" in _load_error(d, "tok")
    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "convert_uce_assets.py"))
    assert json.loads(tool["convert"](d).read_text()) == {"human": 4}  # numpy scalars -> plain JSON
    get_model("uce", {"checkpoint": str(d)}).make_tokenizer(  # type: ignore[attr-defined]
        pd.DataFrame({"position": [0], "symbol": [_first_symbol(d)], "ensembl_id": [None]})
    )
    (d / "species_offsets.json").write_text(json.dumps({"mouse": 4}))  # the converted form wins
    assert "no 'human'" in _load_error(d, "tok")
    assert "no 'cow'" in _load_error(d, "tok", species="cow")
    (d / "species_offsets.json").write_text(json.dumps({"human": 4, "mouse": 10}))
    assert "Mus_musculus" in _load_error(d, "tok", species="mouse")
    (d / "species_chrom.csv").write_text("species,gene_symbol\nhuman,A\n")
    assert "must have columns" in _load_error(d, "tok")
    (d / "species_chrom.csv").unlink()
    assert "species_chrom.csv not found" in _load_error(d, "tok")
    with pytest.raises(UserError, match="species"):
        get_model("uce", {"preset": "tiny", "species": 3})


def test_low_coverage_is_a_user_error(tiny_dir: Path) -> None:
    model = get_model("uce", {"checkpoint": str(tiny_dir)})
    mouse = pd.DataFrame({"position": [0, 1], "symbol": ["Zzz1", "Qqq2"], "ensembl_id": None})
    with pytest.raises(UserError, match="protein embedding"):
        model.make_tokenizer(mouse)  # type: ignore[attr-defined]


def test_token_table_rule(tiny_dir: Path, tmp_path: Path, tiny: tuple) -> None:
    _, module, _ = tiny
    state = torch.load(tiny_dir / "tiny_model.torch", weights_only=True)
    torch.testing.assert_close(module.pe_embedding.weight, state["pe_embedding.weight"])  # all_tokens has no chroms
    d = _copy(tiny_dir, tmp_path / "newspecies")  # a table with more rows (new species) replaces it
    bigger = torch.randn(state["pe_embedding.weight"].shape[0] + 7, TINY["token_dim"])
    torch.save(bigger, d / "all_tokens.torch")
    model = get_model("uce", {"checkpoint": str(d)})
    torch.testing.assert_close(model.load().pe_embedding.weight, bigger)  # type: ignore[attr-defined]
    (d / "all_tokens.torch").unlink()  # optional: without it the state dict's table is used
    torch.testing.assert_close(
        get_model("uce", {"checkpoint": str(d)}).load().pe_embedding.weight,  # type: ignore[attr-defined]
        state["pe_embedding.weight"],
    )


# ------------------------------------------------------------------------------------------- embedding


def _reference(tiny_dir: Path, n_tokens: int) -> nn.Module:
    ref_model = pytest.importorskip("uce.model")
    ref = ref_model.TransformerModel(
        token_dim=TINY["token_dim"], d_model=TINY["d_model"], nhead=TINY["nhead"], d_hid=TINY["d_hid"],
        nlayers=TINY["nlayers"], output_dim=TINY["output_dim"], dropout=0.05,
    )
    ref.pe_embedding = nn.Embedding.from_pretrained(torch.zeros(n_tokens, TINY["token_dim"]))  # as run_eval
    ref.load_state_dict(torch.load(tiny_dir / "tiny_model.torch", weights_only=True), strict=True)
    return ref.eval()


def _reference_embed(ref: nn.Module, sentence: np.ndarray, pad: int = 0) -> torch.Tensor:
    """run_eval's steps for one cell: pe lookup (seq-first), normalise, forward with the 0/1 mask."""
    tokens = torch.from_numpy(np.concatenate([sentence, np.zeros(pad, dtype=sentence.dtype)])).long()[:, None]
    mask = torch.cat([torch.ones(len(sentence)), torch.zeros(pad)])[None, :]
    src = nn.functional.normalize(ref.pe_embedding(tokens), dim=2)
    return ref(src, mask=mask)[1][0]


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")  # the reference's seq-first encoder
def test_embedding_matches_reference_model_and_is_batch_independent(pc9: dict, tiny: tuple, tiny_dir: Path) -> None:
    model, module, tok = tiny
    # a short synthetic cell (3 genes: fewer chromosomes) next to real cells: the batch pads it
    short = {"input_ids": [np.array([3, STANDIN_OFFSET + N_STANDIN + 4, 10, 11, 2], dtype=np.int32)]}
    out = tok(*_cells(pc9, [0, 3, 40]))
    rows = {"input_ids": short["input_ids"] + out["input_ids"]}
    with torch.inference_mode():
        batch = model.embed(module, model.collate(rows))
        alone = model.embed(module, model.collate(short))
        padded = model.embed(module, model.collate(short, pad_to=1536))
    assert batch.shape == (4, TINY["output_dim"]) and batch.dtype == torch.float32
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))
    np.testing.assert_allclose(alone[0].numpy(), batch[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(padded[0].numpy(), batch[0].numpy(), atol=1e-5)

    ref = _reference(tiny_dir, module.pe_embedding.weight.shape[0])
    with torch.no_grad():
        for i, sent in enumerate(rows["input_ids"]):
            np.testing.assert_allclose(batch[i].numpy(), _reference_embed(ref, sent).numpy(), atol=1e-5)
        # the original's float padding mask is added to the logits, so its padded cells attend to padding:
        # that is why ours masks padding and equals the original's unpadded result
        quirk = _reference_embed(ref, short["input_ids"][0], pad=20)
    assert not torch.allclose(quirk, batch[0], atol=1e-3)


def test_bf16_and_token_range(tiny: tuple, tiny_dir: Path, pc9: dict) -> None:
    model, module, tok = tiny
    half = model.load(dtype=torch.bfloat16)
    out = tok(*_cells(pc9, [1]))
    with torch.inference_mode():
        a = model.embed(module, model.collate(out))
        b = model.embed(half, model.collate(out))
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.98
    with pytest.raises(UserError, match="beyond the token table"):
        model.collate({"input_ids": [np.array([3, 10**6], dtype=np.int32)]})


def test_filter_option_is_the_originals_gene_filter(pc9: dict, tiny_dir: Path, tmp_path: Path) -> None:
    """Option ``filter: true`` = the original's default ``--filter`` (uce/data_proc/data_utils.py
    process_raw_anndata lines 207-209: ``sc.pp.filter_genes(min_cells=10)``): genes expressed in fewer than
    10 of the store's cells get no token; every other gene keeps its token. Off by default (a departure,
    recorded in the model's identity); without the store pass it is a one-line error."""
    import anndata as ad
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.store import CellStore

    a = pc9["adata"][:300].copy()
    a.write_h5ad(tmp_path / "pc9_300.h5ad")
    convert_h5ad(tmp_path / "pc9_300.h5ad", tmp_path / "store", ConvertOptions(), progress=False)
    store = CellStore.open(tmp_path / "store")
    plain = get_model("uce", {"checkpoint": str(tiny_dir)})
    assert plain.options["filter"] is False and plain.identity()["options"]["filter"] is False
    filtered = get_model("uce", {"checkpoint": str(tiny_dir), "filter": True})
    with pytest.raises(UserError, match="filter: true counts each gene's cells over the whole store"):
        filtered.make_tokenizer(store.genes)  # type: ignore[attr-defined]
    filtered.check_store(store)
    t_plain, t_filt = plain.make_tokenizer(store.genes), filtered.make_tokenizer(store.genes)  # type: ignore[attr-defined]
    n_cells = np.asarray((ad.read_h5ad(tmp_path / "pc9_300.h5ad").X > 0).sum(axis=0)).ravel()  # scanpy's rule
    rare = n_cells < 10
    pos = store.genes["position"].to_numpy()
    assert (t_filt.token[pos[rare]] == -1).all()
    assert np.array_equal(t_filt.token[pos[~rare]], t_plain.token[pos[~rare]])
    assert (t_plain.token[pos[rare]] >= 0).any()  # the filter really removed known genes
    with pytest.raises(UserError, match="filter"):
        get_model("uce", {"checkpoint": str(tiny_dir), "filter": "yes"})
