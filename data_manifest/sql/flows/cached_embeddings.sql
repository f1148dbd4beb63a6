-- evaluate: the latest ok embeddings of one recognition model ($1), reused instead of embedding again.
SELECT sample_id, embedding FROM embeddings
WHERE model_id = ? AND status = 'ok' AND embedding IS NOT NULL
