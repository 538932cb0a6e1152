from plugins.errors import Errors

__all__ = ["Errors"]
