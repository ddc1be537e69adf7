-- Storage commitment transactions (archive/commitment.py), as migrations/sqlite/0006:
-- one N-ACTION per requester and Transaction UID taken by all the nodes serving this
-- index (PS3.4 J.3.2, J.3.3.1.2); reported = 0 while its report is under way.
CREATE TABLE commitment_transactions (
    requester TEXT NOT NULL,
    transaction_uid TEXT NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (requester, transaction_uid)
);
CREATE INDEX commitment_transactions_received ON commitment_transactions(received);
