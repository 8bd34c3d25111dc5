"""Data pipeline: ingest documents, fit or load a tokenizer, pack token shards."""
