-- The columns a query narrows by hold their values without leading or trailing spaces
-- (padding, PS3.5 Table 6.2-1, not significant in matching, PS3.4 C.2.2.2.1), as the
-- keys are compared; rows indexed before kept a leading space (a Patient ID " P1" was
-- not found by "P1").
UPDATE patients SET patient_id = trim(patient_id, ' ') WHERE patient_id <> trim(patient_id, ' ');
UPDATE studies SET study_date = trim(study_date, ' ') WHERE study_date <> trim(study_date, ' ');
UPDATE studies SET accession = trim(accession, ' ') WHERE accession <> trim(accession, ' ');
UPDATE series SET modality = trim(modality, ' ') WHERE modality <> trim(modality, ' ');
