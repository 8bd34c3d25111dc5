"""Corpus builders (`smalltalk corpus ...`): the demo corpus from text already on a Debian machine (demo.py) and
the evidence corpus corpus10 from packages the registries serve (corpus10.py), with their shared clean-up."""
