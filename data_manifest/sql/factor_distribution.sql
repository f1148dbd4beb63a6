-- Class distribution of every factor (latest label per sample), with fractions.
-- Read from `factor_class_counts` (the latest factor rows counted per factor, class and status, kept next to
-- the snapshots by every refresh): a few dozen rows, where counting `factors` scans every factor row
-- (210M at WebFace42M size). The same answer as grouping `factors WHERE status = 'ok'`.
SELECT factor, class_index, class_name, n,
       round(n / sum(n) OVER (PARTITION BY factor), 4) AS fraction
FROM factor_class_counts
WHERE status = 'ok'
ORDER BY factor, class_index;
