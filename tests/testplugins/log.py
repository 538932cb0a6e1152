from plugins.log import Log

__all__ = ["Log"]
