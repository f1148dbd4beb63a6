-- Cross-tabulation of blur and pose classes (latest labels), other factors as totals per cell.
-- Read from `label_class_counts` (samples per combination of the five classes, kept next to the snapshots
-- by every refresh): the same answer as counting `labels` grouped by blur and pose, without scanning it.
SELECT blur_class, pose_class, sum(n)::BIGINT AS n,
       coalesce(sum(n) FILTER (WHERE occlusion_class = 'obstructed'), 0)::BIGINT AS obstructed,
       coalesce(sum(n) FILTER (WHERE expression_class = 'exaggerated expression'), 0)::BIGINT AS exaggerated,
       coalesce(sum(n) FILTER (WHERE lighting_class = 'extreme lighting'), 0)::BIGINT AS extreme_lighting
FROM label_class_counts
WHERE blur_class IS NOT NULL AND pose_class IS NOT NULL
GROUP BY blur_class, pose_class
ORDER BY blur_class, pose_class;
