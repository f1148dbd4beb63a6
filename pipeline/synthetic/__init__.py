"""Synthetic and demo data: recorded degradations (`degrade`), the demo dataset (`demo_data`), a synthetic WIDER set."""
