-- The archive index (PS3.4 C.6 keys per level), as migrations/sqlite/0001_index.sql.
-- Keys compared by range (name prefix, study date) use the "C" collation: code point
-- order, as SQLite compares. Sizes are 64-bit, modification times double precision.
CREATE TABLE patients (
    patient_key TEXT PRIMARY KEY, patient_id TEXT NOT NULL, name_key TEXT COLLATE "C", attrs TEXT NOT NULL);
CREATE INDEX patients_id ON patients(patient_id);
CREATE INDEX patients_name ON patients(name_key);
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY, patient_key TEXT NOT NULL, study_date TEXT COLLATE "C",
    accession TEXT, attrs TEXT NOT NULL);
CREATE INDEX studies_patient ON studies(patient_key);
CREATE INDEX studies_date ON studies(study_date);
CREATE INDEX studies_accession ON studies(accession);
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT, attrs TEXT NOT NULL);
CREATE INDEX series_study ON series(study_uid);
CREATE TABLE instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
    transfer_syntax TEXT, path TEXT NOT NULL UNIQUE, size BIGINT, mtime DOUBLE PRECISION, attrs TEXT NOT NULL);
CREATE INDEX instances_series ON instances(series_uid);
