"""lomotune: fine-tune every parameter of a language model with memory close to inference."""

__version__ = "0.1.0"
