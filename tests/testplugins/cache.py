from plugins.cache import Cache

__all__ = ["Cache"]
