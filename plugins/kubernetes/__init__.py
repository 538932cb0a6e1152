"""The kubernetes plugin: Kubernetes service discovery (see ``plugin.py`` for the syntax).

The package keeps the pieces apart: ``settings`` (the parsed stanza), ``objects`` and
``index`` (the compact cluster view), ``records`` (answers), ``manifests`` and ``api``
(the two sources that fill the index). Importing the package imports neither source.
"""

from plugins.kubernetes.plugin import Kubernetes

__all__ = ["Kubernetes"]
