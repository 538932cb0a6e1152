from plugins.erratic import Erratic

__all__ = ["Erratic"]
