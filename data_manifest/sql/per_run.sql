-- Factor class counts per labelling run (all history), with the labeller and its thresholds.
SELECT run_id, factor, labeller, labeller_version, thresholds, class_name, count(*) AS n
FROM factors_history
WHERE status = 'ok'
GROUP BY ALL
ORDER BY run_id, factor, class_name;
