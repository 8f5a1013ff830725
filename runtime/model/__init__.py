"""What computes: a checkpoint's architecture from its config, the decoder blocks, embeddings
and heads, rotary embeddings, the KV cache, stage shards and the plan-to-shards loading,
checkpoint and tokenizer reading, and the built-in model with its corpus. Imports
``runtime.quant``, ``runtime.errors`` and ``planner.plan``; never serving or measurement code.
"""
