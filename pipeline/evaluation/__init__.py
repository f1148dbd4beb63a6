"""FIQA evaluation: `metrics` (EDC/ERC, pair quality), `verification_sets` (LFW-style .bin sets), `formats` (score and
pair files), `report`, `plots`."""
