"""Features: an encoder LLM's prefill hidden states, pooled per prompt, and the on-disk store that keeps them.

    from prefill_router.features import load_encoder, extract_to_store, FeatureSet
    enc = load_encoder()                               # SmolLM2-135M-Instruct, offline
    feats = enc.encode(["What is 2+2?"])               # {"mean": [1, 31, 576], "last": [1, 31, 576]} float32
    fs = extract_to_store(prompts, enc, "runs/feats")  # resumable on-disk store
    X = fs.get("mean", layers=[18, 24])                # float32 [N, 2, 576]
"""

from prefill_router.data.prompt import prompt_hash, prompt_hashes
from prefill_router.features.encoder import (
    DEFAULT_ENCODER,
    POOLINGS,
    TRUNCATION_RULE,
    Encoder,
    EncoderSpec,
    cache_dir,
    load_encoder,
)
from prefill_router.features.extract import extract_to_store
from prefill_router.features.reference import SMOLLM2_REFERENCE_IDENTITY, import_features, import_reference
from prefill_router.features.store import FeatureSet, FeatureStore

__all__ = ["DEFAULT_ENCODER", "POOLINGS", "SMOLLM2_REFERENCE_IDENTITY", "TRUNCATION_RULE", "Encoder", "EncoderSpec",
           "FeatureSet", "FeatureStore", "cache_dir", "extract_to_store", "import_features", "import_reference",
           "load_encoder", "prompt_hash", "prompt_hashes"]
