-- anchors --reuse-embeddings: the latest embedding row of the model ($1) per selected sample, stored by
-- another run than this one ($2), grouped by selection shard (the registered _anchors_selection table):
-- an ok one, or a `skipped` one (no aligned crop) when the sample still has no crop and its `faces` row is
-- not newer than that embedding row, so a refresh writes no new row for a faceless sample that did not change.
SELECT s.shard, e.sample_id, e.embedding, e.error
FROM embeddings e JOIN _anchors_selection s ON e.sample_id = s.sample_id
LEFT JOIN faces f ON f.sample_id = e.sample_id
WHERE e.model_id = ? AND e.run_id <> ? AND (
    (e.status = 'ok' AND e.embedding IS NOT NULL)
    OR (e.status = 'skipped' AND f.crop_file IS NULL AND (f.created_at IS NULL OR f.created_at <= e.created_at)))
ORDER BY s.shard, e.sample_id
