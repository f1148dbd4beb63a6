-- The joint factor combinations (the 72-cell space of the prompts) that occur, most frequent first.
-- Read from `label_class_counts` (samples per combination of the five classes, kept next to the snapshots
-- by every refresh): the same answer as counting `labels` grouped by the five classes, without scanning it.
SELECT blur_class, occlusion_class, pose_class, expression_class, lighting_class, n
FROM label_class_counts
WHERE blur_class IS NOT NULL
ORDER BY n DESC, blur_class, occlusion_class, pose_class, expression_class, lighting_class;
