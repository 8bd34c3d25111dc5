"""SmallTalk LM: asynchronous mixtures of language models.

Routers (tiny LMs) trained by EM split the corpus; experts train on their share with no communication;
at inference the prefix picks one expert. See README.md for the pipeline and CLI.
"""

__version__ = "0.1.0"
