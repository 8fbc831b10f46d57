"""TaskRelay: tracks asynchronous image-generation tasks across upstream providers."""

__version__ = "0.1.0"
