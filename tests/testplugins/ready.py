from plugins.ready import Ready

__all__ = ["Ready"]
