-- Paged queries (keyset pagination, archive/query.py): each page is
-- "WHERE <parent> = ? AND key > ? ORDER BY key LIMIT n". With the parent's key and
-- the level's unique key in one index, the rows of one patient, study or series are
-- read in key order from the index (no sort of all of them at every page). Each
-- replaces the index on the parent's key alone (its prefix).
DROP INDEX IF EXISTS studies_patient;
CREATE INDEX studies_patient ON studies(patient_key, study_uid);
DROP INDEX IF EXISTS series_study;
CREATE INDEX series_study ON series(study_uid, series_uid);
DROP INDEX IF EXISTS instances_series;
CREATE INDEX instances_series ON instances(series_uid, sop_uid);
