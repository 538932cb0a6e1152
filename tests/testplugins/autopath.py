from plugins.autopath import AutoPath

__all__ = ["AutoPath"]
