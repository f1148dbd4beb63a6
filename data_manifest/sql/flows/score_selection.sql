-- score: the samples to score, with their aligned crop (one row per sample).
SELECT s.sample_id, fc.crop_file, fc.crop_index, fc.status AS face_status, fc.error AS face_error
FROM samples s LEFT JOIN faces fc USING (sample_id)
