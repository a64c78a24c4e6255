"""The policy model: a Flax NNX Llama 3 / Qwen2 / Qwen3 decoder, KV cache, HF checkpoints in/out.

See `grpo_jax.models.decoder` for the call contract (forward, cache, sharding).
"""

from grpo_jax.models.config import (SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf,
                                    config_to_hf)
from grpo_jax.models.hf import (from_pretrained, hf_tensors, load_peft_adapters, peft_tensors,
                                save_peft_adapters, save_pretrained)
from grpo_jax.models.lora import (LoraConfig, LoraParam, add_lora, has_lora, merge_lora, trainable,
                                  without_lora)
from grpo_jax.models.logprobs import (logprobs_from_hidden, token_logprobs,
                                      token_logprobs_and_entropy)
from grpo_jax.models.decoder import (Decoder, KVCache, cache_logical_axes, decoder_hidden,
                                     default_positions, init_cache, init_sharded,
                                     logical_axes_tree, repeat_cache, shard_model,
                                     state_shardings)

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ModelConfig", "config_from_hf", "config_to_hf",
    "Decoder", "KVCache", "cache_logical_axes", "decoder_hidden", "default_positions",
    "init_cache", "init_sharded", "logical_axes_tree", "repeat_cache", "shard_model",
    "state_shardings", "from_pretrained", "save_pretrained", "hf_tensors",
    "logprobs_from_hidden", "token_logprobs", "token_logprobs_and_entropy",
    "LoraConfig", "LoraParam", "add_lora", "has_lora", "merge_lora", "trainable", "without_lora",
    "load_peft_adapters", "peft_tensors", "save_peft_adapters",
]
