"""Features: an encoder LLM's prefill hidden states, pooled per prompt, and the on-disk store that keeps them.

    from prefill_router.features import load_encoder
    enc = load_encoder()                      # SmolLM2-135M-Instruct, offline
    feats = enc.encode(["What is 2+2?"])      # {"mean": [1, 31, 576], "last": [1, 31, 576]} float32
"""

from prefill_router.features.encoder import (DEFAULT_ENCODER, POOLINGS, TRUNCATION_RULE, Encoder, EncoderSpec,
                                             load_encoder)
from prefill_router.features.template import prompt_hash, prompt_hashes

__all__ = ["DEFAULT_ENCODER", "POOLINGS", "TRUNCATION_RULE", "Encoder", "EncoderSpec", "load_encoder",
           "prompt_hash", "prompt_hashes"]
