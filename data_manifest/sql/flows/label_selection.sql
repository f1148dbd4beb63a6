-- label: the samples to label, with what ingest and any earlier alignment recorded (one row per sample).
SELECT l.sample_id, l.source_kind, l.source, l.sample_status, l.sample_error,
       f.status AS face_status, f.error AS face_error, f.crop_file, f.crop_index, f.landmarks, f.transform
FROM labels AS l LEFT JOIN faces AS f USING (sample_id)
