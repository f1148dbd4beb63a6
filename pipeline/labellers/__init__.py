"""Label stages, one file per labeller: `base` (the record and row types), `registry` (stages by name),
align, blur, pose, occlusion, expression, lighting, attributes."""
