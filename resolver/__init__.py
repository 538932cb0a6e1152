"""corefile-resolver: a CoreDNS-compatible caching DNS server in Python.

The core (this package) parses the Corefile, runs the plugin chain and serves UDP and
TCP; it knows no plugin by name. Plugins live in the top-level ``plugins`` package.
"""

__version__ = "0.1.0"
