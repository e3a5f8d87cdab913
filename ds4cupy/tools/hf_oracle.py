"""Tiny random transformers `DeepseekV4ForCausalLM` models: the independent oracle for the NumPy reference.

Every parameter is randomised (transformers initialises sinks, HC base, position biases and the router bias to 0, HC
scale to 1 and tid2eid to all zeros, which would hide mistakes): norms around 1, HC scales in [0.3, 0.7], sinks / HC
bases / compressor position biases ~ N(0, 0.7^2), projections ~ N(0, 1/fan_in), router bias ~ N(0, 0.5^2), and every
tid2eid row holds distinct experts. Used by tests/test_transformers_parity.py and `ds4cupy verify`.

The indexer gets 64 heads (the real count): with few heads relu(q.k) is 0 for every head of some compressed rows,
those rows tie at an exact score of 0, and which tied row a top-k picks is implementation-defined (torch.topk vs our
lowest-index rule): a difference in tie-breaking, not in the model.
"""
from __future__ import annotations

DEFAULT_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                       "compressed_sparse_attention")


def random_tiny_model(vocab: int = 1024, seed: int = 3, layer_types=DEFAULT_LAYER_TYPES, hca_rate: int = 16,
                      hash_layers: int = 2, index_topk: int = 3, sinkhorn_iters: int = 20, swiglu_limit: float = 10.0,
                      hc_eps: float = 1e-6):
    """A float32, eval-mode DeepseekV4ForCausalLM: window 8, CSA ratio 4, HCA ratio `hca_rate`, 8 experts (3 used),
    hidden 64, 4 heads of 96 with 32 rope dims (a head size the GPU kernels take too), YaRN (factor 16, original
    context 32), `sinkhorn_iters` mHC Sinkhorn iterations, the SwiGLU clamp at `swiglu_limit` and the mHC epsilon
    `hc_eps` (the real model's 20, 10 and 1e-6 by default; few iterations leave the mixing far from converged, a
    small limit makes the clamp act and a large epsilon makes each place it is added count, so a slip in any of them
    shows). Needs torch + transformers."""
    import torch
    import transformers

    cfg = transformers.DeepseekV4Config(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4, head_dim=96,
        qk_rope_head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=32, moe_intermediate_size=48,
        n_routed_experts=8, num_experts_per_tok=3, num_hash_layers=hash_layers, sliding_window=8,
        layer_types=list(layer_types),
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca_rate},
        index_n_heads=64, index_head_dim=32, index_topk=index_topk,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1},
        max_position_embeddings=512, tie_word_embeddings=False, hc_sinkhorn_iters=sinkhorn_iters,
        swiglu_limit=swiglu_limit, hc_eps=hc_eps)
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * r)
            elif name.endswith((".scale", "hc_scale")):
                p.copy_(0.3 + 0.4 * torch.rand(p.shape, generator=g))
            elif name.endswith(("sinks", ".base", "hc_base", "position_bias")):
                p.copy_(0.7 * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)
        n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    return model
