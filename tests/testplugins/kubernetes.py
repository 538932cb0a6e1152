from plugins.kubernetes import Kubernetes

__all__ = ["Kubernetes"]
