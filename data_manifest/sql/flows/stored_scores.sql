-- evaluate --quality scores:METHOD[@DATASET]: a method's latest ok scores with each sample's source
-- ($dataset NULL: every dataset).
SELECT sc.sample_id, s.source, sc.quality
FROM scores sc JOIN samples s USING (sample_id)
WHERE sc.method = $method AND sc.status = 'ok' AND sc.quality IS NOT NULL
  AND ($dataset IS NULL OR s.dataset = $dataset)
