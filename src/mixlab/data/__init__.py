"""Data: corpus ingest, tokenizer, token shards (numpy memmap + manifest) and the sampler."""
