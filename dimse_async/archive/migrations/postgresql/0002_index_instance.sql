-- Indexing one instance in one round trip: the statements of the archive's generic
-- index write (ingest.index_statements), in the same order and with the same
-- conflict handling, run by the server. Called as one statement, so atomic.
CREATE FUNCTION index_instance(
    p_patient_key TEXT, p_patient_id TEXT, p_patient_attrs TEXT, p_name_key TEXT,
    p_study_uid TEXT, p_study_date TEXT, p_accession TEXT, p_study_attrs TEXT,
    p_series_uid TEXT, p_modality TEXT, p_series_attrs TEXT,
    p_sop_uid TEXT, p_sop_class TEXT, p_transfer_syntax TEXT, p_path TEXT, p_size BIGINT,
    p_mtime DOUBLE PRECISION, p_attrs TEXT
) RETURNS void LANGUAGE sql AS $$
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
$$;
