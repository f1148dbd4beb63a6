-- Cross-tabulation of blur and pose classes (latest labels), other factors as totals per cell.
SELECT blur_class, pose_class, count(*) AS n,
       count(*) FILTER (WHERE occlusion_class = 'obstructed') AS obstructed,
       count(*) FILTER (WHERE expression_class = 'exaggerated expression') AS exaggerated,
       count(*) FILTER (WHERE lighting_class = 'extreme lighting') AS extreme_lighting
FROM labels
WHERE blur_class IS NOT NULL AND pose_class IS NOT NULL
GROUP BY ALL
ORDER BY blur_class, pose_class;
