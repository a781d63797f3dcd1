"""hivefold: volunteer-computing training of language models over hivemind.

This package holds the code both roles use: the run spec, tokenizer, model, corpus and shard
codec, peer identity, checkpoints and the ``hivefold`` command line.
"""

__version__ = "0.1.0"
