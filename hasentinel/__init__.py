"""hasentinel: a health sentinel for a node-local HAProxy in front of the kube-apiservers."""

__version__ = "0.1.0"
