from plugins.loop import Loop

__all__ = ["Loop"]
