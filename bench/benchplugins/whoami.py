from plugins.whoami import Whoami

__all__ = ["Whoami"]
