"""State-dict layout of performer-pytorch's ``Performer`` layers, shared by the models built on it
(scBERT, CellLM, and scFoundation's decoder): the official checkpoints of all three use its names."""

from __future__ import annotations


def performer_layer_shapes(
    prefix: str, dim: int, depth: int, inner: int, dim_head: int, nb_features: int, ff_mult: int = 4,
    qkv_bias: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``{prefix}net.layers.<i>`` for every layer, in registration order:
    ``[PreLayerNorm(SelfAttention), PreLayerNorm(Chunk(FeedForward))]``."""
    ff = ff_mult * dim
    out: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        a = f"{prefix}net.layers.{i}.0."
        out[a + "norm.weight"] = (dim,)
        out[a + "norm.bias"] = (dim,)
        out[a + "fn.fast_attention.projection_matrix"] = (nb_features, dim_head)
        for name in ("to_q", "to_k", "to_v"):
            out[a + f"fn.{name}.weight"] = (inner, dim)
            if qkv_bias:
                out[a + f"fn.{name}.bias"] = (inner,)
        out[a + "fn.to_out.weight"] = (dim, inner)
        out[a + "fn.to_out.bias"] = (dim,)
        f = f"{prefix}net.layers.{i}.1."
        out[f + "norm.weight"] = (dim,)
        out[f + "norm.bias"] = (dim,)
        out[f + "fn.fn.w1.weight"] = (ff, dim)
        out[f + "fn.fn.w1.bias"] = (ff,)
        out[f + "fn.fn.w2.weight"] = (dim, ff)
        out[f + "fn.fn.w2.bias"] = (dim,)
    return out
