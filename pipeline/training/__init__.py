"""The CLIB-FIQA training set (the query over factors and anchors) and the confidence scores it writes."""
