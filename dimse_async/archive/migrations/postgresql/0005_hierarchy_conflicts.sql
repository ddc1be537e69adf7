-- index_instance (0003) refusing an instance whose series is held under another
-- study, or whose study for another patient, while other instances are in it (a UID
-- names one entity, PS3.3 A.1.2): moved, the instances held would be answered under
-- a study or patient their data sets do not name. SQLSTATE DA001, the message naming
-- which (backend.SERIES_CONFLICT, backend.STUDY_CONFLICT); nothing is written. The
-- series, then the study, is locked for the transaction first (advisory locks, always
-- in that order): two stores naming one series or study under different parents at
-- once are judged one after the other, the second seeing the first.
CREATE OR REPLACE FUNCTION index_instance(
    p_patient_key TEXT, p_patient_id TEXT, p_patient_attrs TEXT, p_name_key TEXT,
    p_study_uid TEXT, p_study_date TEXT, p_accession TEXT, p_study_attrs TEXT,
    p_series_uid TEXT, p_modality TEXT, p_series_attrs TEXT,
    p_sop_uid TEXT, p_sop_class TEXT, p_transfer_syntax TEXT, p_path TEXT, p_size BIGINT,
    p_mtime DOUBLE PRECISION, p_attrs TEXT
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    old_series TEXT[];
    old_study TEXT;
    old_patient TEXT;
BEGIN
    PERFORM pg_advisory_xact_lock(1515870810, hashtext(p_series_uid));
    PERFORM pg_advisory_xact_lock(1515870811, hashtext(p_study_uid));
    SELECT array_agg(series_uid) INTO old_series FROM instances
        WHERE (sop_uid = p_sop_uid OR path = p_path) AND series_uid <> p_series_uid;
    SELECT study_uid INTO old_study FROM series WHERE series_uid = p_series_uid AND study_uid <> p_study_uid;
    IF old_study IS NOT NULL
            AND EXISTS (SELECT 1 FROM instances WHERE series_uid = p_series_uid AND sop_uid <> p_sop_uid) THEN
        RAISE EXCEPTION 'Series Instance UID is in another study' USING ERRCODE = 'DA001';
    END IF;
    SELECT patient_key INTO old_patient FROM studies WHERE study_uid = p_study_uid AND patient_key <> p_patient_key;
    IF old_patient IS NOT NULL AND EXISTS (
            SELECT 1 FROM series s JOIN instances i ON i.series_uid = s.series_uid
            WHERE s.study_uid = p_study_uid AND i.sop_uid <> p_sop_uid) THEN
        RAISE EXCEPTION 'Study Instance UID is another patient''s' USING ERRCODE = 'DA001';
    END IF;
    INSERT INTO patients (patient_key, patient_id, attrs, name_key) VALUES (p_patient_key, p_patient_id, p_patient_attrs, p_name_key)
        ON CONFLICT (patient_key) DO UPDATE SET attrs = excluded.attrs, name_key = excluded.name_key;
    INSERT INTO studies VALUES (p_study_uid, p_patient_key, p_study_date, p_accession, p_study_attrs)
        ON CONFLICT (study_uid) DO UPDATE SET patient_key = excluded.patient_key, study_date = excluded.study_date,
        accession = excluded.accession, attrs = excluded.attrs;
    INSERT INTO series VALUES (p_series_uid, p_study_uid, p_modality, p_series_attrs)
        ON CONFLICT (series_uid) DO UPDATE SET study_uid = excluded.study_uid, modality = excluded.modality,
        attrs = excluded.attrs;
    DELETE FROM instances WHERE path = p_path AND sop_uid != p_sop_uid;
    INSERT INTO instances VALUES (p_sop_uid, p_series_uid, p_sop_class, p_transfer_syntax, p_path, p_size, p_mtime, p_attrs)
        ON CONFLICT (sop_uid) DO UPDATE SET series_uid = excluded.series_uid, sop_class = excluded.sop_class,
        transfer_syntax = excluded.transfer_syntax, path = excluded.path, size = excluded.size,
        mtime = excluded.mtime, attrs = excluded.attrs;
    IF old_series IS NOT NULL OR old_study IS NOT NULL OR old_patient IS NOT NULL THEN
        PERFORM drop_emptied(old_series, ARRAY[old_study], ARRAY[old_patient]);
    END IF;
END;
$$;
