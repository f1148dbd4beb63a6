-- Class distribution of every factor (latest label per sample), with fractions.
SELECT factor, class_index, class_name, count(*) AS n,
       round(count(*) / sum(count(*)) OVER (PARTITION BY factor), 4) AS fraction
FROM factors
WHERE status = 'ok'
GROUP BY factor, class_index, class_name
ORDER BY factor, class_index;
