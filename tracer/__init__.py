"""gpt2-tracer: layer-by-layer differential debugging of GPT-2 ports."""

__version__ = "0.1.0"
