"""Routed post-training: instruction-tune each expert on the examples its router sends it.

  template.py  the one chat template (stored with the tokenizer; the server's chat endpoint renders the
               same text) and the encoding of a conversation with its assistant-only loss mask
  examples.py  reading instruction files (JSONL messages or prompt/completion, parquet)
  data.py      encoded examples as padded rows + labels, the trainer's data interface
  job.py       route every example once, fine-tune each expert and a dense baseline, write RUN/sft
  measure.py   assistant-token perplexity, per domain; routing stability
  demo.py      `smalltalk corpus sft-demo`: a labelled instruction set made from a local corpus
"""
