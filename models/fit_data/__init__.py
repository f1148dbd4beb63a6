"""The data the small labelling CNNs are fitted on: real face sets (package and face-api photos)
and synthetic occluders."""
