-- Paged queries (keyset pagination, archive/query.py), as migrations/sqlite/0003:
-- the parent's key and the level's unique key in one index, so the rows of one
-- patient, study or series are read in key order (no sort at every page).
DROP INDEX IF EXISTS studies_patient;
CREATE INDEX studies_patient ON studies(patient_key, study_uid);
DROP INDEX IF EXISTS series_study;
CREATE INDEX series_study ON series(study_uid, series_uid);
DROP INDEX IF EXISTS instances_series;
CREATE INDEX instances_series ON instances(series_uid, sop_uid);
