-- Histogram of the normalised quality anchors (latest per sample) in ten bins of width 0.1.
SELECT least(floor(anchor * 10), 9) / 10 AS bin_start, count(*) AS n,
       round(avg(anchor), 4) AS mean_anchor
FROM anchors
WHERE status = 'ok' AND anchor IS NOT NULL
GROUP BY ALL
ORDER BY bin_start;
