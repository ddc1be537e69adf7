-- Series, studies and patients left without instances by earlier versions (an
-- instance stored again under another series, study or patient moved and left them
-- behind); from now on an index write deletes them in its own transaction.
DELETE FROM series WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid);
DELETE FROM studies WHERE NOT EXISTS (SELECT 1 FROM series s WHERE s.study_uid = studies.study_uid);
DELETE FROM patients WHERE NOT EXISTS (SELECT 1 FROM studies t WHERE t.patient_key = patients.patient_key);
