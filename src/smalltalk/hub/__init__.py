"""The mixture in the Hugging Face layout: the two files every export carries (configuration_smalltalk.py,
modeling_smalltalk.py; torch and transformers only) and load with `trust_remote_code=True`."""
