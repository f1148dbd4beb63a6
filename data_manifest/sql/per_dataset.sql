-- Factor class counts per dataset (latest labels).
SELECT s.dataset, f.factor, f.class_name, count(*) AS n
FROM factors f JOIN samples s USING (sample_id)
WHERE f.status = 'ok'
GROUP BY ALL
ORDER BY s.dataset, f.factor, f.class_name;
