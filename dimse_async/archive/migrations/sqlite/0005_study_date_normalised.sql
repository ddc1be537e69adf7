-- The Study Date column as the C-FIND prefilter compares it (date_ranges.index_date):
-- YYYYMMDD, the first day of the stored value's period; '' for anything else (an
-- unknown value, several values, no date), which is always a candidate. Rows indexed
-- before held the value as stored: an ACR-NEMA 1993.02.15, a year or a month did not
-- compare with YYYYMMDD bounds as text, and a range query missed their studies. (A
-- value of the shape of a date that is none, 19931350, stays: the matcher refuses it.)
UPDATE studies SET study_date = trim(study_date) WHERE study_date <> trim(study_date);
UPDATE studies SET study_date = substr(study_date, 1, 4) || substr(study_date, 6, 2) || substr(study_date, 9, 2)
    WHERE study_date LIKE '____.__.__';
UPDATE studies SET study_date = study_date || '0101'
    WHERE length(study_date) = 4 AND ltrim(study_date, '0123456789') = '';
UPDATE studies SET study_date = study_date || '01'
    WHERE length(study_date) = 6 AND ltrim(study_date, '0123456789') = '';
UPDATE studies SET study_date = ''
    WHERE study_date <> '' AND NOT (length(study_date) = 8 AND ltrim(study_date, '0123456789') = '');
