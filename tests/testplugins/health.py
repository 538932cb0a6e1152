from plugins.health import Health

__all__ = ["Health"]
