"""pdbox: a one-box P/D LLM serving appliance."""
__version__ = "0.1.0"
