"""Prefill routing inside the stacks users already run.

    prefill_router.integrations.litellm   a LiteLLM routing plugin and callback (extra: `[litellm]`)

Each integration imports its host package itself, so importing this package needs nothing extra.
"""
