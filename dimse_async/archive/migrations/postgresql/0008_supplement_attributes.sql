-- The attributes of a patient, study or series held with other instances are
-- supplemented, not replaced, by another instance's (backend.supplement_attrs, the same
-- rule): each attribute held with a value keeps it, one held without a value takes the
-- received one; the Specific Character Set stays unless a received value was taken in
-- another one (then ISO_IR 192). The first instance stored names the study; one that
-- disagrees later changes nothing. An entity whose only instance is the one indexed
-- takes the received values. The columns a query narrows by (name_key, study_date,
-- accession, modality) follow the attributes kept. json, not jsonb: a value may hold
-- U+0000, which jsonb refuses.
CREATE OR REPLACE FUNCTION supplement_attrs(held TEXT, received TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    WITH o AS (SELECT key, value FROM json_each(held::json) WHERE key <> 'SpecificCharacterSet'),
         t AS (SELECT key, value FROM json_each(received::json)
               WHERE key <> 'SpecificCharacterSet' AND value::text <> '""'
                 AND key NOT IN (SELECT key FROM o WHERE value::text <> '""')),
         cs AS (SELECT coalesce((held::json -> 'SpecificCharacterSet')::text, '""') AS h,
                       coalesce((received::json -> 'SpecificCharacterSet')::text, '""') AS r),
         c AS (SELECT CASE
                   WHEN NOT EXISTS (SELECT 1 FROM t) OR r = '""' OR r = h THEN h
                   WHEN h = '""' THEN r
                   ELSE '"ISO_IR 192"' END AS value FROM cs)
    SELECT coalesce(json_object_agg(key, value)::text, '{}') FROM (
        SELECT key, value FROM o WHERE key NOT IN (SELECT key FROM t)
        UNION ALL SELECT key, value FROM t
        UNION ALL SELECT 'SpecificCharacterSet', value::json FROM c WHERE value <> '""'
    ) AS merged
$$;

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
    held_attrs TEXT;
    held_column TEXT;
    held_accession TEXT;
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
    SELECT attrs, name_key INTO held_attrs, held_column FROM patients WHERE patient_key = p_patient_key;
    IF FOUND AND held_attrs <> p_patient_attrs AND EXISTS (
            SELECT 1 FROM studies t JOIN series s ON s.study_uid = t.study_uid JOIN instances i ON i.series_uid = s.series_uid
            WHERE t.patient_key = p_patient_key AND i.sop_uid <> p_sop_uid) THEN
        p_patient_attrs := supplement_attrs(held_attrs, p_patient_attrs);
        IF coalesce((held_attrs::json -> 'PatientName')::text, '""') <> '""' THEN p_name_key := held_column; END IF;
    END IF;
    SELECT attrs, study_date, accession INTO held_attrs, held_column, held_accession FROM studies WHERE study_uid = p_study_uid;
    IF FOUND AND held_attrs <> p_study_attrs AND EXISTS (
            SELECT 1 FROM series s JOIN instances i ON i.series_uid = s.series_uid
            WHERE s.study_uid = p_study_uid AND i.sop_uid <> p_sop_uid) THEN
        p_study_attrs := supplement_attrs(held_attrs, p_study_attrs);
        IF coalesce((held_attrs::json -> 'StudyDate')::text, '""') <> '""' THEN p_study_date := held_column; END IF;
        IF coalesce((held_attrs::json -> 'AccessionNumber')::text, '""') <> '""' THEN p_accession := held_accession; END IF;
    END IF;
    SELECT attrs, modality INTO held_attrs, held_column FROM series WHERE series_uid = p_series_uid;
    IF FOUND AND held_attrs <> p_series_attrs AND EXISTS (SELECT 1 FROM instances WHERE series_uid = p_series_uid AND sop_uid <> p_sop_uid) THEN
        p_series_attrs := supplement_attrs(held_attrs, p_series_attrs);
        IF coalesce((held_attrs::json -> 'Modality')::text, '""') <> '""' THEN p_modality := held_column; END IF;
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
