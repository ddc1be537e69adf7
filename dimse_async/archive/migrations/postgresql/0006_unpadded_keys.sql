-- As migrations/sqlite/0004: the columns a query narrows by without leading or
-- trailing spaces (PS3.5 Table 6.2-1, PS3.4 C.2.2.2.1).
UPDATE patients SET patient_id = btrim(patient_id, ' ') WHERE patient_id <> btrim(patient_id, ' ');
UPDATE studies SET study_date = btrim(study_date, ' ') WHERE study_date <> btrim(study_date, ' ');
UPDATE studies SET accession = btrim(accession, ' ') WHERE accession <> btrim(accession, ' ');
UPDATE series SET modality = btrim(modality, ' ') WHERE modality <> btrim(modality, ' ');
