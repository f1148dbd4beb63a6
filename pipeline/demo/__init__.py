"""The end-to-end demo's checks, EDC inputs and printed summary (the flow is `flows/demo.py`)."""
