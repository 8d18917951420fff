"""Model sizes by name. A preset fills `model.*`; keys given next to it override it."""

PRESETS: dict[str, dict] = {
    # For tests and CPU runs: heads and kv_heads are multiples of a tensor axis of 8.
    "tiny": dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8,
                 head_dim=32, d_ff=768, rope_theta=10000.0, tie_embeddings=True),
    # ~10M params (about 8.6M in matrices): big enough that memory tests see sharding, not
    # small replicated leaves.
    "small": dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=8, n_kv_heads=8,
                  head_dim=48, d_ff=1024, rope_theta=10000.0, tie_embeddings=False),
    "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 head_dim=64, d_ff=2048, rope_theta=10000.0, tie_embeddings=True),
    # Llama-3.2-1B shape.
    "1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
               head_dim=64, d_ff=8192, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_position=8192, norm_eps=1e-5),
    # Llama-3.1-8B shape.
    "8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               head_dim=128, d_ff=14336, rope_theta=500000.0, tie_embeddings=False,
               rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_position=8192, norm_eps=1e-5),
    # A tiny mixture of experts for tests and CPU runs: 8 experts of width 384, top-2.
    "tiny-moe": dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8,
                     head_dim=32, d_ff=768, rope_theta=10000.0, tie_embeddings=True,
                     n_experts=8, experts_per_token=2, moe_d_ff=384),
    # Mixtral-8x7B shape (46.7B params, 12.9B active per token), for planning.
    "mixtral-8x7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         head_dim=128, d_ff=14336, rope_theta=1000000.0, tie_embeddings=False,
                         norm_eps=1e-5, n_experts=8, experts_per_token=2, moe_d_ff=14336,
                         router_aux_loss=0.02),
    # Gemma-3-27B text shape, for planning: 5 local (window 1,024) : 1 global layers, the global
    # layers' RoPE scaled linearly x8.
    "gemma3-27b": dict(vocab_size=262208, d_model=5376, n_layers=62, n_heads=32, n_kv_heads=16,
                       head_dim=128, d_ff=21504, rope_theta=1000000.0, rope_local_theta=10000.0,
                       tie_embeddings=True, qk_norm=True, sliding_window=1024, global_every=6,
                       mlp_act="gelu_tanh", embed_scale=True, post_norms=True, norm_plus_one=True,
                       query_pre_attn_scalar=168.0, rope_linear_factor=8.0),
    # Qwen3-30B-A3B shape (30.5B params, 3.3B active per token), for planning: 128 experts, top-8.
    "qwen3-30b-a3b": dict(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                          head_dim=128, d_ff=6144, rope_theta=1000000.0, tie_embeddings=False,
                          qk_norm=True, n_experts=128, experts_per_token=8, moe_d_ff=768,
                          router_aux_loss=0.001),
    # Llama-3.1-70B shape.
    "70b": dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                head_dim=128, d_ff=28672, rope_theta=500000.0, tie_embeddings=False,
                rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                rope_original_max_position=8192, norm_eps=1e-5),
}
