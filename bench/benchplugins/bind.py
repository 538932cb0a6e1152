from plugins.bind import Bind

__all__ = ["Bind"]
