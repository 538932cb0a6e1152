from plugins.loadbalance import LoadBalance

__all__ = ["LoadBalance"]
