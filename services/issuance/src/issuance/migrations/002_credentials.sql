-- W3C Bitstring Status Lists. `bits` is the list (bit i is the status of the credential holding
-- index i); `document` is the signed BitstringStatusListCredential exactly as served, re-signed in
-- the same transaction as every change of `bits`.
CREATE TABLE status_lists (
    list_id    uuid        PRIMARY KEY,
    purpose    text        NOT NULL CHECK (purpose IN ('revocation', 'suspension')),
    size       integer     NOT NULL CHECK (size >= 131072 AND size % 8 = 0),
    bits       bytea       NOT NULL CHECK (octet_length(bits) * 8 = size),
    document   text        NOT NULL,
    is_full    boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

-- New credentials take their index from the one open list of a purpose; a full list is closed
-- and another opened.
CREATE UNIQUE INDEX status_lists_one_open ON status_lists (purpose) WHERE NOT is_full;

-- Indexes handed out. Random, so a list's neighbours say nothing about each other; the primary key
-- makes a collision (or a concurrent claim of the same index) a retry, never a shared index.
CREATE TABLE status_indexes (
    list_id    uuid    NOT NULL REFERENCES status_lists (list_id),
    list_index integer NOT NULL CHECK (list_index >= 0),
    PRIMARY KEY (list_id, list_index)
);

-- Issued credentials. `document` is the signed credential exactly as served; `document_sha256`
-- its hash (hex), to notice a stored document that changed.
CREATE TABLE credentials (
    credential_id        uuid        PRIMARY KEY,
    kind                 text        NOT NULL CHECK (kind IN ('course', 'pathway')),
    learner_id           uuid        NOT NULL,
    -- Kept to mint pathway credentials later (the subject is identified by a salted hash of it).
    learner_email        text        NOT NULL,
    learner_display_name text        NOT NULL,
    enrollment_id        uuid        UNIQUE,
    course_id            uuid,
    course_version       bigint,
    pathway_id           uuid,
    pathway_version      bigint,
    issuer_id            uuid        NOT NULL,
    achievement_id       uuid        NOT NULL,
    achievement_name     text        NOT NULL,
    document             text        NOT NULL,
    document_sha256      text        NOT NULL CHECK (document_sha256 ~ '^[0-9a-f]{64}$'),
    issued_at            timestamptz NOT NULL,
    valid_until          timestamptz CHECK (valid_until > issued_at),
    revocation_list_id   uuid        NOT NULL,
    revocation_index     integer     NOT NULL,
    revoked_at           timestamptz,
    revocation_reason    text,
    suspended_at         timestamptz,
    suspension_reason    text,
    FOREIGN KEY (revocation_list_id, revocation_index) REFERENCES status_indexes (list_id, list_index),
    UNIQUE (revocation_list_id, revocation_index),
    CHECK (kind <> 'course' OR (enrollment_id IS NOT NULL AND course_id IS NOT NULL
                                AND course_version IS NOT NULL AND pathway_id IS NULL)),
    CHECK (kind <> 'pathway' OR (pathway_id IS NOT NULL AND pathway_version IS NOT NULL
                                 AND enrollment_id IS NULL AND course_id IS NULL)),
    CHECK ((revoked_at IS NULL) = (revocation_reason IS NULL)),
    CHECK ((suspended_at IS NULL) = (suspension_reason IS NULL)),
    -- Revocation is final and supersedes a suspension.
    CHECK (revoked_at IS NULL OR suspended_at IS NULL)
);

-- One live pathway credential per learner and pathway; a revoked one may be earned again.
CREATE UNIQUE INDEX credentials_one_live_pathway ON credentials (learner_id, pathway_id)
    WHERE kind = 'pathway' AND revoked_at IS NULL;

-- A learner's credentials, newest first (keyset pagination), and the courses they hold.
CREATE INDEX credentials_by_learner ON credentials (learner_id, issued_at DESC, credential_id DESC);

-- Every credential, newest first, for staff.
CREATE INDEX credentials_by_issue ON credentials (issued_at DESC, credential_id DESC);
