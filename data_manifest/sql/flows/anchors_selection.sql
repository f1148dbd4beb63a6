-- anchors: the samples to embed, with their current identity and aligned crop (one row per sample).
SELECT s.sample_id, s.identity, fc.crop_file, fc.crop_index, fc.status AS face_status, fc.error AS face_error
FROM samples s LEFT JOIN faces fc USING (sample_id)
