"""Training the WIDER attribute CNN: crops from WIDER FACE, training and evaluation, the report."""
