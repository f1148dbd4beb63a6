-- Row status per table (latest rows): what failed and why, at a glance.
SELECT 'samples' AS tbl, status, count(*) AS n FROM samples GROUP BY ALL
UNION ALL SELECT 'faces', status, count(*) FROM faces GROUP BY ALL
UNION ALL SELECT 'factors', status, count(*) FROM factors GROUP BY ALL
UNION ALL SELECT 'anchors', status, count(*) FROM anchors GROUP BY ALL
UNION ALL SELECT 'scores', status, count(*) FROM scores GROUP BY ALL
ORDER BY tbl, status;
