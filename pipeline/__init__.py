"""Pure compute of the pipeline: labellers/, readers/, evaluation/, synthetic/, and image decoding, ids, anchors."""
