"""The `lptrain train` trainer: typed recipes, a Llama-style decoder, `datasets` input,
DeepSpeed engine, atomic checkpoints with exact resume, and rank-0 metrics.

Modules: config (recipe files), model, data, precision (bridge to lptrain.nn), engine
(DeepSpeed), checkpoint, monitor (metrics.jsonl, W&B, progress), trainer (the loop), cli.
"""
