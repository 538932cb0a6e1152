from plugins.acl import Acl

__all__ = ["Acl"]
