"""LLM arm without an engine: cell sentences on real cells, the llama tokenizer (truncation), strict
loading, the prompt builder and the strict answer parser on realistic answers, spec and planner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from realcells import cells
from safetensors.torch import load_file, save_file
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.llm.prompt import PromptCell, build_messages, fit_messages, parse_answer
from scdrugmap_ray.engine.llm.sentence import SentenceBuilder, SentenceSpec
from scdrugmap_ray.engine.models.base import get_model
from scdrugmap_ray.engine.models.llama import Llama, load_transformers, read_config


@pytest.fixture(scope="module")
def tiny() -> Path:
    return Llama(preset="tiny").checkpoint_dir()  # written once into the cache


# ------------------------------------------------------------------------------------ cell sentences


def test_ranked_sentence_on_real_cells(pc9: dict) -> None:
    _, gi, vals = cells(pc9, [0, 5, 17])
    b = SentenceBuilder(pc9["genes"], SentenceSpec(top_k=30))
    syms = np.asarray(pc9["symbols"])
    for g, v in zip(gi, vals, strict=True):
        words = b.words(g, v)
        order = np.argsort(-v, kind="stable")[:30]
        assert words == [syms[g[i]].replace(" ", "_") for i in order]
        assert len(words) == min(30, int((v > 0).sum()))
    # zero-expression genes never appear, even when listed with value 0
    w = b.words(np.array([0, 1, 2]), np.array([0.0, 3.0, 0.0]))
    assert w == [syms[1]]


def test_value_format_and_paper_format(pc9: dict) -> None:
    _, gi, vals = cells(pc9, [3])
    b = SentenceBuilder(pc9["genes"], SentenceSpec(top_k=5, value_format="{:g}"))
    words = b.words(gi[0], vals[0])
    top = np.argsort(-vals[0], kind="stable")[0]
    assert words[0] == f"{pc9['symbols'][gi[0][top]]}:{vals[0][top]:g}"
    paper = SentenceBuilder(pc9["genes"], SentenceSpec(format="paper")).words(gi[0], vals[0])
    assert len(paper) == len(pc9["symbols"])  # every gene, in column order, zeros included
    assert paper[0].startswith(pc9["symbols"][0] + ":")
    assert sum(w.endswith(":0") for w in paper) == len(pc9["symbols"]) - len(gi[0])
    with pytest.raises(UserError, match="format"):
        SentenceSpec(format="nope")
    with pytest.raises(UserError, match="value_format"):
        SentenceSpec(value_format="{:q}")


def test_tokenizer_truncates_by_dropping_lowest_ranked_genes(pc9: dict, tiny: Path) -> None:
    ids, gi, vals = cells(pc9, [0, 1])
    full = Llama(checkpoint=str(tiny), top_k=200).make_tokenizer(pc9["genes"])
    cut = Llama(checkpoint=str(tiny), top_k=200, max_length=40).make_tokenizer(pc9["genes"])
    a, b = full(ids, gi, vals), cut(ids, gi, vals)
    for i in range(2):
        kept, dropped = b["genes"][i]
        assert len(b["input_ids"][i]) <= 40 and dropped > 0 and a["genes"][i][1] == 0
        words = full.builder.words(gi[i], vals[i])
        assert kept + dropped == len(words)
        # the kept genes are the top-ranked prefix, and one more gene would not fit
        assert list(b["input_ids"][i]) == full.encode(" ".join(words[:kept]))
        assert len(full.encode(" ".join(words[: kept + 1]))) > 40
        assert b["input_ids"][i][0] == a["input_ids"][i][0]  # the tokenizer's BOS stays


def test_batch_independence_transformers_backend(pc9: dict, tiny: Path) -> None:
    import torch

    m = Llama(checkpoint=str(tiny), top_k=50, backend="transformers")
    tok = m.make_tokenizer(pc9["genes"])
    ids, gi, vals = cells(pc9, [0, 1, 2, 3])
    rows = tok(ids, gi, vals)
    module = m.load()
    with torch.inference_mode():
        mixed = m.embed(module, m.collate(rows)).numpy()
        for i in range(4):
            alone = m.embed(module, m.collate({k: [v[i]] for k, v in rows.items()})).numpy()
            np.testing.assert_allclose(alone[0], mixed[i], atol=1e-5)
        # the rule: mean of the final hidden state over the sentence's tokens
        h = module(input_ids=torch.tensor(rows["input_ids"][2][None].astype(np.int64))).last_hidden_state[0]
        np.testing.assert_allclose(mixed[2], h.mean(0).numpy(), atol=1e-5)


def test_strict_loading_and_not_a_causal_lm(tiny: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    sd = load_file(bad / "model.safetensors")
    key = next(k for k in sd if "layers.1.mlp.up_proj" in k)
    sd.pop(key)
    sd["model.extra.weight"] = sd[next(iter(sd))].clone()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        load_transformers(bad)
    assert "missing keys" in str(err.value) and "up_proj" in str(err.value) and "model.extra.weight" in str(err.value)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UserError, match="not a causal language model"):
        read_config(bert)
    with pytest.raises(UserError, match="not a causal language model"):
        get_model("llama", {"checkpoint": str(bert)}).load()
    with pytest.raises(UserError, match=r"no config\.json"):
        read_config(tmp_path)


def test_presets_match_official_shapes(tiny: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = read_config(tiny)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vLLM's CPU kernels need it
    real = Llama.presets["llama-3-8b"]
    hf = LlamaConfig(**{k: v for k, v in real.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(hf).parameters())
    assert n == 8_030_261_248  # Meta-Llama-3-8B
    assert (tiny / "RANDOM_WEIGHTS.json").exists() and Llama(checkpoint=str(tiny)).random_weights


# ------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("text", "label", "p"),
    [
        ('{"label": "sensitive", "confidence": 0.8}', 1, 0.8),
        ('  {"label": "Resistant", "confidence": 0.7}\n', 0, pytest.approx(0.3)),
        ('```json\n{"label": "resistant", "confidence": 1}\n```', 0, 0.0),
        ('```\n{"confidence": 0.55, "label": "SENSITIVE"}\n```', 1, 0.55),
    ],
)
def test_parser_accepts_strict_answers(text: str, label: int, p: float) -> None:
    a = parse_answer(text)
    assert not a.abstained and a.label == label and a.p_sensitive == p


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('Sure! Here is my answer: {"label": "sensitive", "confidence": 0.8}', "not a JSON object"),
        ('{"label": "sensitive", "confidence": 0.8, "reasoning": "EGFR is high"}', "unexpected"),
        ('{"label": "sensitive"}', "missing"),
        ('{"label": "partially sensitive", "confidence": 0.6}', "label"),
        ('{"label": "resistant", "confidence": "0.9"}', "confidence"),
        ('{"label": "resistant", "confidence": 87}', "confidence"),
        ('{"label": "resistant", "confidence": true}', "confidence"),
        ('{"label": "sensitive", "confidence": 0.', "not a JSON object"),
        ('["sensitive", 0.9]', "not a JSON object"),
        ("The cell is likely resistant.", "not a JSON object"),
        ("", "empty"),
        (None, "no answer"),
    ],
)
def test_parser_abstains_on_anything_else(text: str | None, reason: str) -> None:
    a = parse_answer(text)
    assert a.abstained and reason in (a.reason or "") and a.p_sensitive == 0.5


def test_prompt_has_context_but_never_dataset_or_sample() -> None:
    meta = {"cancer_type": "lung adenocarcinoma", "therapy": "targeted therapy", "regimen": "erlotinib",
            "dataset": "GSE149383", "sample": "GSM4503936"}
    q = PromptCell(["EGFR", "KRT18", "ACTB"], meta)
    ex = [PromptCell(["VIM", "CD44"], meta, 0), PromptCell(["MKI67"], meta, 1)]
    msgs = build_messages(q, ex, context=True, with_values=False)
    text = json.dumps(msgs)
    assert "erlotinib" in text and "lung adenocarcinoma" in text
    assert "GSE" not in text and "GSM" not in text
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert parse_answer(msgs[2]["content"]).label == 0 and parse_answer(msgs[4]["content"]).label == 1
    assert "erlotinib" not in json.dumps(build_messages(q, [], context=False, with_values=False))


def test_prompt_cut_to_context_drops_lowest_ranked_genes() -> None:
    q = PromptCell([f"G{i}" for i in range(100)], {})
    msgs, dropped = fit_messages(q, [], context=False, with_values=False,
                                 count_tokens=lambda m: sum(len(x["content"].split()) for x in m), budget=110)
    words = msgs[-1]["content"].removeprefix("Cell: ").split()
    system = len(msgs[0]["content"].split())
    assert dropped == 100 - len(words) and dropped > 0
    assert words == [f"G{i}" for i in range(len(words))]  # the top-ranked ones stay
    assert system + 1 + len(words) <= 110 < system + 2 + len(words)


# ------------------------------------------------------------------------------------ spec / planner


def _spec(strategies: list[str], models: list[dict], prompting: dict | None = None) -> dict:
    return {"name": "t", "data": [{"simulate": {"cells": 100}}], "models": models, "strategies": strategies,
            "prompting": prompting or {}, "evaluation": {"pooled": {"folds": 2}}}


def test_spec_prompt_strategies() -> None:
    from scdrugmap_ray.jobs.planner import plan_units
    from scdrugmap_ray.jobs.spec import can_run, parse_spec

    assert can_run("openai-chat", "zero_shot") and not can_run("openai-chat", "frozen")
    assert can_run("llama", "frozen") and can_run("llama", "few_shot") and not can_run("geneformer", "zero_shot")
    assert not can_run("llama", "lora") and can_run("geneformer", "lora")
    with pytest.raises(UserError, match="none of the strategies"):
        parse_spec(_spec(["zero_shot"], [{"name": "geneformer", "options": {"preset": "tiny"}}]))
    with pytest.raises(UserError, match="cannot run strategy 'frozen'"):
        parse_spec(_spec(["zero_shot"], [{"name": "openai-chat", "strategies": ["frozen"]}]))
    with pytest.raises(UserError, match="prompting"):
        parse_spec(_spec(["few_shot"], [{"name": "openai-chat"}], {"kk": 3}))
    with pytest.raises(UserError, match="at least 1"):
        parse_spec(_spec(["few_shot"], [{"name": "openai-chat"}], {"k": 0}))
    spec = parse_spec(_spec(["frozen", "zero_shot", "few_shot"],
                            [{"name": "pca-logreg"}, {"name": "openai-chat"}], {"k": 2}))
    obs = pd.DataFrame({"cell_id": [f"c{i}" for i in range(40)], "label": [i % 2 for i in range(40)],
                        "dataset": "d", "sample": [f"s{i % 4}" for i in range(40)]})
    units = plan_units(spec, {"sim": obs})
    pairs = {(u.model.name, u.strategy, u.head) for u in units}
    assert pairs == {("pca-logreg", "frozen", "logreg"), ("openai-chat", "zero_shot", "prompt"),
                     ("openai-chat", "few_shot", "prompt")}
    spec = parse_spec(_spec(["frozen", "zero_shot"], [{"name": "llama", "options": {"preset": "tiny"},
                                                       "strategies": ["frozen"]}]))
    assert {u.strategy for u in plan_units(spec, {"sim": obs})} == {"frozen"}


def test_few_shot_examples_come_from_training_rows_balanced() -> None:
    from scdrugmap_ray.engine.llm.predict import pick_examples

    obs = pd.DataFrame({"label": [1, 0] * 50})
    train = np.arange(0, 60)
    ex = pick_examples(obs, train, 5, seed=3)
    assert set(ex) <= set(train) and len(ex) == 5
    assert sorted(obs["label"].to_numpy()[ex].tolist()) == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(ex, pick_examples(obs, train, 5, seed=3))
