"""Settings: named model presets, and the engine's one options object.

A preset is plain data (like nanoGPT's GPTConfig), so notebooks, the planner and the benchmark
can build a config without touching any weights: Mixtral's in ``MODEL_PRESETS``, the other
families' published models in ``FAMILY_PRESETS`` (``preset_config(name)`` builds either). Quantization presets live in
``moe_colab.quant.config``. ``OffloadOptions`` holds every engine setting; the library keeps
no process-wide switches, and environment variables (``ENVIRONMENT``) only set defaults.

References: Mixtral-8x7B shapes from arXiv 2401.04088 and ../shared/reference/paper.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

# Keyword arguments for transformers.MixtralConfig.
MODEL_PRESETS: dict[str, dict] = {
    # Mixtral-8x7B(-Instruct): 46.7B parameters, 45.1B of them in experts.
    "mixtral-8x7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1e6, tie_word_embeddings=False,
    ),
    # The built-in model moe_colab/tiny/weights (moe_colab/tiny/train.py): 9.1M parameters, trained on the stdlib.
    "tiny": dict(
        vocab_size=4096, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=1e4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    ),
    # A few-layer random model for unit tests: every code path, milliseconds per token.
    "debug": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
    ),
}

# The other families' published models: name -> (model_type, keyword arguments of the family's
# transformers config class), from each model's config.json; tests/test_family_plans.py checks
# them against transformers' classes and the published parameter counts.
FAMILY_PRESETS: dict[str, tuple[str, dict]] = {
    # Qwen3-30B-A3B (and Qwen3-Coder-30B-A3B): 30.5B parameters, 3.3B active
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)),
    # gpt-oss-20b: 20.9B parameters, 3.6B active; experts published in MXFP4
    "gpt-oss-20b": ("gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=7.0, tie_word_embeddings=False)),
    # OLMoE-1B-7B (0924): 6.9B parameters, 1.3B active
    "olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False)),
    # DeepSeek-V2-Lite: 15.7B parameters, 2.4B active; MLA attention, layer 0 dense, 2 shared experts
    "deepseek-v2-lite": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Qwen1.5-MoE-A2.7B: 14.3B parameters, 2.7B active; a shared expert of 5632 with a sigmoid gate
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)),
    # Phi-3.5-MoE-instruct: 41.9B parameters, 6.6B active; sparse-mixer top-2
    "phi-3.5-moe": ("phimoe", dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        router_jitter_noise=0.01, input_jitter_noise=0.01, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
}

# Hub ids the loader accepts by short name.
HUB_ALIASES: dict[str, str] = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}
# Hub ids of the presets: the planner answers for them without downloading their config.json.
PRESET_HUB_IDS: dict[str, str] = {
    "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b",
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": "qwen3-30b-a3b", "openai/gpt-oss-20b": "gpt-oss-20b",
    "allenai/OLMoE-1B-7B-0924": "olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924-Instruct": "olmoe-1b-7b",
    "deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite",
    "Qwen/Qwen1.5-MoE-A2.7B": "qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B-Chat": "qwen1.5-moe-a2.7b",
    "microsoft/Phi-3.5-MoE-instruct": "phi-3.5-moe",
}


def mixtral_config(name: str, **overrides):
    """A transformers.MixtralConfig for a named preset (``"mixtral-8x7b"``, ``"debug"``)."""
    from transformers import MixtralConfig

    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MixtralConfig(**{**MODEL_PRESETS[name], **overrides})


def preset_names() -> list[str]:
    """Every model preset: Mixtral's (MODEL_PRESETS) and the other families' (FAMILY_PRESETS)."""
    return sorted(MODEL_PRESETS) + sorted(FAMILY_PRESETS)


def preset_config(name: str, **overrides):
    """The transformers config (the family's own class) of a named preset: "mixtral-8x7b",
    "qwen3-30b-a3b", "gpt-oss-20b", "olmoe-1b-7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b", ..."""
    if name in MODEL_PRESETS:
        return mixtral_config(name, **overrides)
    if name not in FAMILY_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    from .adapters import adapter_for
    model_type, kwargs = FAMILY_PRESETS[name]
    return adapter_for(model_type).config_class()(**{**kwargs, **overrides})


# Every environment variable moe_colab reads, in one place (docs/engine.md lists them too).
# They only set DEFAULTS: an argument passed in code always wins.
ENVIRONMENT: dict[str, str] = {
    "MOE_COLAB_CUDA_GRAPHS": "default of OffloadOptions.cuda_graphs: 1 on (default), 0 off",
    "MOE_COLAB_HOST_SYNC": "default of OffloadOptions.host_sync: 'mapped' or 'copy'",
    "MOE_COLAB_KERNELS": "default of OffloadOptions.kernels: 'auto', 'triton' or 'torch'",
    "MOE_COLAB_DEVICE_BYTES": "device budget of the planner and load_model's checks, e.g. '15GiB' (default: measured)",
    "MOE_COLAB_HOST_BYTES": "host budget of the planner and load_model's checks, e.g. '12.7GB' (default: measured)",
    "MOE_COLAB_MODEL": "notebooks: the checkpoint used instead of the built-in tiny model",
    "MOE_COLAB_MIXTRAL": "notebooks: a quantized Mixtral directory for the real-model path",
    "MOE_COLAB_STATIC": "notebooks: 1 draws static figures instead of live widgets",
    "MOE_COLAB_DEBUG": "the command line: 1 shows the Python traceback of a user error",
    "MOE_COLAB_TEST_THREADS": "tests: torch threads (default 1)",
    "MOE_COLAB_SOAK_OUT": "tests: where the GPU soak test writes its JSON",
    "MOE_COLAB_SAVE_SCREENSHOT": "tests: where the browser test saves its screenshot",
}

GUESS_SOURCES = ("auto", "before", "after")
# Batching a layer's experts saves launches but waits for all its copies before any compute; it
# pays for many small experts (Qwen3: 8 of 128), not for Mixtral's 2 large ones (whose hits
# compute while the misses are copied).
BATCH_MIN_TOP_K = 4
HOST_SYNCS = ("mapped", "copy")
KERNELS = ("auto", "triton", "torch")


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return default
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"${name}={value!r}: expected 1 or 0")


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"${name}={value!r}: expected one of {choices}")
    return value


@dataclass(frozen=True)
class OffloadOptions:
    """Every setting of the offloading engine, built once, validated once, kept on the model
    (``model.offload_options``). ``OffloadOptions.defaults(**changes)`` fills what is not given
    from the environment (``ENVIRONMENT``), then from the defaults below."""

    experts_on_device: int = 4   # device slots per layer (the paper: 4 of 8 on a T4, 2 on 12 GB)
    prefetch: int = 2            # experts of layer l+1 loaded speculatively while layer l runs
    guess_from: str = "auto"     # the hidden state of that guess: engine/prefetch.py, guess_source
    swap: bool = False           # an expert lives on the device OR the host (engine/storage.py)
    cuda_graphs: bool = True     # replay one-token calls as CUDA graphs where CUDA runs (engine/graphs.py)
    host_sync: str = "mapped"    # how the router's choice reaches the host (engine/hostsync.py)
    reuse: bool = True           # False: every use is a miss (the benchmark's "no cache" row)
    kernels: str = "auto"        # low-bit matmuls: Triton where it runs, else torch (engine/compute.py)
    prefetch_min_share: float = 0.4   # a guess the next router gives less than this share of a
                                      #   uniform router's 1/E is not copied (0.05 for Mixtral's 8)
    spare_slots: int = 2         # swap mode: device slots any layer's load may take (no waiting
                                 #   for write-backs); the planner counts them
    extra_host_rows: int = 0     # swap mode: host rows beyond E - k + 1 (spread over layers), so
                                 #   an evicted expert more often still has its host copy
    batched_experts: bool | None = None   # one token: a layer's selected experts as one grouped call
                                           #   per matrix when they fit its slots (engine/batched.py);
                                           #   None: when top_k >= BATCH_MIN_TOP_K (many small experts)

    @classmethod
    def defaults(cls, **changes) -> "OffloadOptions":
        """Options with the environment's defaults; keyword arguments (not None) win."""
        env = dict(cuda_graphs=_env_flag("MOE_COLAB_CUDA_GRAPHS", True),
                   host_sync=_env_choice("MOE_COLAB_HOST_SYNC", "mapped", HOST_SYNCS),
                   kernels=_env_choice("MOE_COLAB_KERNELS", "auto", KERNELS))
        return cls(**{**env, **{k: v for k, v in changes.items() if v is not None}})

    def validate(self, num_experts: int) -> "OffloadOptions":
        """Raise TypeError/ValueError naming the bad setting; return self."""
        _check_count("experts_on_device", self.experts_on_device, 1, num_experts)
        _check_count("prefetch", self.prefetch, 0, num_experts)
        for name, value, choices in (("guess_from", self.guess_from, GUESS_SOURCES),
                                     ("host_sync", self.host_sync, HOST_SYNCS),
                                     ("kernels", self.kernels, KERNELS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.batched_experts not in (None, True, False):
            raise TypeError(f"batched_experts must be True, False or None (auto), got {self.batched_experts!r}")
        for name in ("swap", "cuda_graphs", "reuse"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("spare_slots", "extra_host_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        share = self.prefetch_min_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= num_experts:
            raise ValueError(f"prefetch_min_share must be in [0, {num_experts}] (a share of 1/E), got {share!r}")
        if self.swap and not self.reuse:
            raise ValueError("reuse=False (no cache) needs copy mode: in swap mode a slot holds the only "
                             "copy of its expert")
        return self

    def replace(self, **changes) -> "OffloadOptions":
        return replace(self, **changes)


def _check_count(name: str, value, lowest: int, num_experts: int) -> None:
    """An int in lowest..num_experts, else TypeError / ValueError naming the model's expert count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lowest <= value <= num_experts:
        raise ValueError(f"{name}={value} is outside {lowest}..{num_experts} "
                         f"(this model has {num_experts} experts per layer)")
