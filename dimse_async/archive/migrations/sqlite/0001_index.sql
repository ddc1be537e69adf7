-- The archive index (PS3.4 C.6 keys per level): patients keyed by ID + issuer, or by
-- name + birth date when the ID is empty; attributes of each level as JSON text.
CREATE TABLE IF NOT EXISTS patients (
    patient_key TEXT PRIMARY KEY, patient_id TEXT NOT NULL, name_key TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS patients_id ON patients(patient_id);
CREATE INDEX IF NOT EXISTS patients_name ON patients(name_key);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, patient_key TEXT NOT NULL, study_date TEXT,
    accession TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_key);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
    transfer_syntax TEXT, path TEXT NOT NULL UNIQUE, size INTEGER, mtime REAL, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
