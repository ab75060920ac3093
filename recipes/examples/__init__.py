"""Small example policies with their recipes (run in CI): start from ``slowlink.py``."""
