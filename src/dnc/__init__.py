"""Deep Nearest Centroids."""
__version__ = "0.1.0"
