"""Files in and out: shard-on-load from safetensors, sharded checkpoints, transformers models and tp_plans."""
