-- The plant historian's schema, version 1 (docs/historian.md, "The database").
--
-- Every natural key starts with line_id: N lines share one database. Times are kept as
-- the line's own ISO text (started_at, recorded_at, t ...) so that a report read from
-- here is byte-identical to the line's; a parsed copy (started_ts) exists only where a
-- query filters or sorts by time. No foreign keys: records arrive out of order (a replay
-- after an outage brings metres before their reel's start), and a historian must take
-- whatever the line holds, in whatever order it comes. Identifiers (line, store, reel)
-- are COLLATE "C": compared bytewise, so key lookups cost the same in any database
-- locale, and they sort the same everywhere.

-- Each line's record stores (a store is one SQLite file, named by its store_id UUID).
-- epoch numbers a line's stores in the order the historian first saw them.
CREATE TABLE line_stores (
    line_id       text COLLATE "C" NOT NULL,
    store_id      text COLLATE "C" NOT NULL,
    epoch         integer          NOT NULL,
    confirmed_seq bigint           NOT NULL DEFAULT 0 CHECK (confirmed_seq >= 0),
    max_seq       bigint           NOT NULL DEFAULT 0 CHECK (max_seq >= 0),
    head_seq      bigint,
    first_seen    timestamptz      NOT NULL DEFAULT now(),
    head_at       timestamptz,
    PRIMARY KEY (line_id, store_id),
    UNIQUE (line_id, epoch)
);

-- The raw stream: every record as the line sent it, once per (line, store, seq).
-- problem: NULL when the record was applied to the tables below; otherwise why not (or
-- not wholly): malformed, or a natural key held with other content. The same text is in
-- incidents; the raw record stays here so that nothing the line sent is ever lost.
CREATE TABLE records (
    line_id     text COLLATE "C" NOT NULL,
    store_id    text COLLATE "C" NOT NULL,
    seq         bigint           NOT NULL CHECK (seq > 0),
    kind        text             NOT NULL,
    t           text             NOT NULL,
    data        jsonb            NOT NULL,
    received_at timestamptz      NOT NULL DEFAULT now(),
    problem     text,
    PRIMARY KEY (line_id, store_id, seq)
);

-- One row per reel. A row may exist before its start arrives (its end came first): the
-- start's columns are then NULL and readers skip the row until the start is here.
-- reel_line_id: the line id the line's own store wrote into the reel (normally line_id).
CREATE TABLE reels (
    line_id          text COLLATE "C" NOT NULL,
    reel_id          text COLLATE "C" NOT NULL,
    reel_line_id     text COLLATE "C",
    recipe_product   text,
    recipe_version   text,
    recipe_hash      text,
    recipe_json      text,
    operator         text,
    planned_length_m double precision,
    started_at       text,
    started_ts       timestamptz,
    started_month    date,
    start_json       text,
    state            text             NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
    ended_at         text,
    end_reason       text,
    store_id         text COLLATE "C",
    start_seq        bigint,
    end_seq          bigint,
    PRIMARY KEY (line_id, reel_id)
);
-- A reel by its id on any line (the report of a reel asked for without its line).
CREATE INDEX reels_reel ON reels (reel_id);
-- The plant reel list: by start time, by line, by product (each then by start time).
CREATE INDEX reels_started ON reels (started_ts) WHERE started_at IS NOT NULL;
CREATE INDEX reels_line_started ON reels (line_id, started_ts) WHERE started_at IS NOT NULL;
CREATE INDEX reels_product_started ON reels (recipe_product, started_ts)
    WHERE started_at IS NOT NULL;

-- Per reel: the month partition its metres live in and the tallies the plant reel list
-- needs without scanning metres (as linectl.store.RecordStore.metre_tallies: metres
-- stored, of them in spec, the last stored index; -1 when none).
-- reel_month is the reel's start month once its start is known (month_from_start); a
-- reel whose metres came before its start has them in the month of the first of those
-- metres' record time until the start arrives, when they are moved to the start month.
CREATE TABLE reel_tallies (
    line_id          text COLLATE "C" NOT NULL,
    reel_id          text COLLATE "C" NOT NULL,
    reel_month       date             NOT NULL,
    month_from_start boolean          NOT NULL,
    stored           integer          NOT NULL DEFAULT 0,
    in_spec          integer          NOT NULL DEFAULT 0,
    last_idx         integer          NOT NULL DEFAULT -1,
    PRIMARY KEY (line_id, reel_id)
);

-- Every metre, partitioned by the month of its reel's start (reel_tallies.reel_month):
-- one reel's metres sit in one partition. Partitions (metres_yYYYYmMM) are created on
-- demand at ingest. The primary key is the natural key plus the partition key; one
-- reel's metres by index (the report) are a range of it.
CREATE TABLE metres (
    line_id      text COLLATE "C" NOT NULL,
    reel_id      text COLLATE "C" NOT NULL,
    idx          integer          NOT NULL CHECK (idx >= 0),
    dose_kgy     double precision,
    min_dose_kgy double precision,
    max_dose_kgy double precision,
    verdict      text             NOT NULL,
    causes       text             NOT NULL DEFAULT '',
    recorded_at  text             NOT NULL,
    reel_month   date             NOT NULL,
    PRIMARY KEY (line_id, reel_id, reel_month, idx)
) PARTITION BY RANGE (reel_month);

-- Alarms and audit events: their ids are the line's store's own (SQLite AUTOINCREMENT),
-- unique within one store file only, so the store is part of their key.
-- A row may exist before its "raised" record (an acknowledgement came first): raised_at
-- is NULL then, and readers skip it until the raise is here.
CREATE TABLE alarms (
    line_id         text COLLATE "C" NOT NULL,
    store_id        text COLLATE "C" NOT NULL,
    alarm_id        bigint           NOT NULL,
    reel_id         text COLLATE "C",
    kind            text             NOT NULL,
    message         text             NOT NULL,
    raised_at       text,
    acknowledged_at text,
    acknowledged_by text,
    cleared_at      text,
    PRIMARY KEY (line_id, store_id, alarm_id)
);
CREATE INDEX alarms_reel ON alarms (line_id, reel_id);

-- detail: the event's detail as JSON text with sorted keys, exactly as the line's store
-- keeps it (jsonb would reorder the keys, and the report shows them in order).
CREATE TABLE events (
    line_id  text COLLATE "C" NOT NULL,
    store_id text COLLATE "C" NOT NULL,
    event_id bigint           NOT NULL,
    t        text             NOT NULL,
    reel_id  text COLLATE "C",
    actor    text             NOT NULL,
    action   text             NOT NULL,
    detail   text             NOT NULL,
    accepted boolean          NOT NULL,
    reason   text             NOT NULL DEFAULT '',
    PRIMARY KEY (line_id, store_id, event_id)
);
CREATE INDEX events_reel ON events (line_id, reel_id);

-- What the historian could not take as it came: gaps it could not recover, a store
-- restored from a backup, conflicts (a seq or natural key held with other content: the
-- first stored is kept, the other content is here), malformed records.
CREATE TABLE incidents (
    id          bigserial        PRIMARY KEY,
    line_id     text COLLATE "C" NOT NULL,
    store_id    text COLLATE "C",
    detected_at timestamptz      NOT NULL DEFAULT now(),
    kind        text             NOT NULL,
    detail      jsonb            NOT NULL
);
CREATE INDEX incidents_line ON incidents (line_id, id);
