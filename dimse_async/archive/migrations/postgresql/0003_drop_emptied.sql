-- An instance stored again under another series, study or patient (duplicates =
-- "replace", a changed file re-indexed) moves; the series, study or patient it leaves
-- without instances is deleted in the same transaction (never found by a C-FIND with
-- nothing to retrieve). Each parent is locked before its emptiness is checked: a
-- concurrent store putting an instance under it holds its row (upserted) until it
-- commits, and the check, a new statement, then sees that instance and keeps it.
CREATE FUNCTION drop_emptied(p_series TEXT[], p_studies TEXT[], p_patients TEXT[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k TEXT;
    parent TEXT;
    v_studies TEXT[] := coalesce(p_studies, '{}');
    v_patients TEXT[] := coalesce(p_patients, '{}');
BEGIN
    FOREACH k IN ARRAY coalesce(p_series, '{}') LOOP
        PERFORM 1 FROM series WHERE series_uid = k FOR UPDATE;
        parent := NULL;
        DELETE FROM series WHERE series_uid = k AND NOT EXISTS (SELECT 1 FROM instances WHERE series_uid = k)
            RETURNING study_uid INTO parent;
        IF parent IS NOT NULL THEN v_studies := v_studies || parent; END IF;
    END LOOP;
    FOREACH k IN ARRAY v_studies LOOP
        PERFORM 1 FROM studies WHERE study_uid = k FOR UPDATE;
        parent := NULL;
        DELETE FROM studies WHERE study_uid = k AND NOT EXISTS (SELECT 1 FROM series WHERE study_uid = k)
            RETURNING patient_key INTO parent;
        IF parent IS NOT NULL THEN v_patients := v_patients || parent; END IF;
    END LOOP;
    FOREACH k IN ARRAY v_patients LOOP
        PERFORM 1 FROM patients WHERE patient_key = k FOR UPDATE;
        DELETE FROM patients WHERE patient_key = k AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_key = k);
    END LOOP;
END;
$$;

-- index_instance (0002) with the parents it may leave looked up first, dropped last.
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
    SELECT array_agg(series_uid) INTO old_series FROM instances
        WHERE (sop_uid = p_sop_uid OR path = p_path) AND series_uid <> p_series_uid;
    SELECT study_uid INTO old_study FROM series WHERE series_uid = p_series_uid AND study_uid <> p_study_uid;
    SELECT patient_key INTO old_patient FROM studies WHERE study_uid = p_study_uid AND patient_key <> p_patient_key;
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

-- What earlier versions left behind.
DELETE FROM series s WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = s.series_uid);
DELETE FROM studies t WHERE NOT EXISTS (SELECT 1 FROM series s WHERE s.study_uid = t.study_uid);
DELETE FROM patients p WHERE NOT EXISTS (SELECT 1 FROM studies t WHERE t.patient_key = p.patient_key);
