-- anchors --reuse-embeddings: the latest ok embedding of the model ($1) per selected sample, stored by
-- another run than this one ($2), grouped by selection shard (the registered _anchors_selection table).
SELECT s.shard, e.sample_id, e.embedding
FROM embeddings e JOIN _anchors_selection s ON e.sample_id = s.sample_id
WHERE e.model_id = ? AND e.status = 'ok' AND e.embedding IS NOT NULL AND e.run_id <> ?
ORDER BY s.shard, e.sample_id
