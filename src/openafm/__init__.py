"""OpenAFM: an open implementation of the Apple Intelligence foundation-model system (2024)."""

__version__ = "0.1.0"
