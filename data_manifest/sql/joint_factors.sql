-- The joint factor combinations (the 72-cell space of the prompts) that occur, most frequent first.
SELECT blur_class, occlusion_class, pose_class, expression_class, lighting_class, count(*) AS n
FROM labels
WHERE blur_class IS NOT NULL
GROUP BY ALL
ORDER BY n DESC, blur_class, occlusion_class, pose_class, expression_class, lighting_class;
