from plugins.prometheus import Prometheus

__all__ = ["Prometheus"]
