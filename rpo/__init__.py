"""rpo: Relative Preference Optimization (contrast-matrix preference losses) for LLM alignment."""

__version__ = "0.1.0"
