-- train-attributes: the crops of one run ($run) with their WIDER ground-truth targets ($labeller), per split.
SELECT s.dataset, s.source, fc.crop_file, fc.crop_index, fc.aligned_mode,
       max(fx.value) FILTER (WHERE fx.factor = 'occlusion') AS occlusion,
       max(fx.value) FILTER (WHERE fx.factor = 'expression') AS expression,
       max(fx.value) FILTER (WHERE fx.factor = 'lighting') AS lighting
FROM faces_history fc
JOIN samples_history s ON s.sample_id = fc.sample_id AND s.run_id = fc.run_id
JOIN factors_history fx ON fx.sample_id = fc.sample_id AND fx.run_id = fc.run_id AND fx.labeller = $labeller
WHERE fc.run_id = $run AND fc.status = 'ok' AND fc.crop_file IS NOT NULL
GROUP BY ALL
ORDER BY s.dataset, fc.crop_file, fc.crop_index
