-- train-attributes: per split of one run ($run), crops written (aligned / box) and faces without a crop.
SELECT s.dataset,
       count(*) FILTER (WHERE fc.status = 'ok' AND fc.crop_file IS NOT NULL) AS crops,
       count(*) FILTER (WHERE fc.aligned_mode = 'detect' AND fc.crop_file IS NOT NULL) AS aligned,
       count(*) FILTER (WHERE fc.aligned_mode = 'box' AND fc.crop_file IS NOT NULL) AS box,
       count(*) FILTER (WHERE fc.status <> 'ok') AS failed
FROM faces_history fc JOIN samples_history s ON s.sample_id = fc.sample_id AND s.run_id = fc.run_id
WHERE fc.run_id = $run
GROUP BY s.dataset
