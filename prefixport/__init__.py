"""prefixport: deploy soft-prompt and prefix adapters on one frozen, exported LLM."""

__version__ = "0.1.0"
