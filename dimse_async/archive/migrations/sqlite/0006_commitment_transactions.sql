-- Storage commitment transactions (archive/commitment.py) by requester and Transaction
-- UID, so that every process and node serving this index takes one N-ACTION per
-- Transaction UID (PS3.4 J.3.2, J.3.3.1.2): reported = 0 while its report is under way,
-- 1 once it went out (or failed for good). Rows older than a month are dropped.
CREATE TABLE commitment_transactions (
    requester TEXT NOT NULL,
    transaction_uid TEXT NOT NULL,
    received REAL NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (requester, transaction_uid)
);
CREATE INDEX commitment_transactions_received ON commitment_transactions(received);
