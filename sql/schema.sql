-- mitwelten-storage catalog schema.
--
-- Creates, in the current schema (the tool sets search_path to --schema), the tables of
-- Mitwelten's production schema v2 that the storage tool reads and writes, column-compatible
-- with production. Idempotent: every statement can run again against an existing catalog,
-- including the production one, and changes nothing that is already there.
--
-- Left out on purpose: production's exclusion constraint on deployments (node_id, period),
-- which needs the btree_gist extension and a superuser; the tool does not rely on it.

CREATE TABLE IF NOT EXISTS nodes
(
    node_id serial,
    node_label character varying(32) NOT NULL,
    type character varying(128) NOT NULL,
    serial_number character varying(128),
    platform character varying(128),
    connectivity character varying(128),
    power character varying(128),
    hardware_version character varying(128),
    software_version character varying(128),
    firmware_version character varying(128),
    description text,
    created_at timestamptz NOT NULL DEFAULT current_timestamp,
    updated_at timestamptz NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (node_id),
    UNIQUE (node_label)
);

CREATE TABLE IF NOT EXISTS deployments
(
    deployment_id serial,
    node_id integer NOT NULL REFERENCES nodes (node_id) ON DELETE RESTRICT,
    location point NOT NULL,
    description text,
    period tstzrange NOT NULL DEFAULT tstzrange('-infinity', 'infinity'),
    PRIMARY KEY (deployment_id)
);

CREATE TABLE IF NOT EXISTS tags
(
    tag_id serial,
    name character varying(255) NOT NULL,
    created_at timestamptz DEFAULT current_timestamp,
    updated_at timestamptz DEFAULT current_timestamp,
    PRIMARY KEY (tag_id),
    UNIQUE (name)
);

CREATE TABLE IF NOT EXISTS mm_tags_deployments
(
    tags_tag_id integer REFERENCES tags (tag_id) ON DELETE RESTRICT,
    deployments_deployment_id integer REFERENCES deployments (deployment_id) ON DELETE CASCADE,
    PRIMARY KEY (tags_tag_id, deployments_deployment_id)
);

CREATE TABLE IF NOT EXISTS files_image
(
    file_id serial,
    object_name text NOT NULL,
    sha256 character varying(64) NOT NULL,
    time timestamptz NOT NULL,
    deployment_id integer NOT NULL REFERENCES deployments (deployment_id),
    file_size integer NOT NULL,
    resolution integer[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT current_timestamp,
    updated_at timestamptz NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (file_id),
    UNIQUE (object_name),
    UNIQUE (sha256)
);

CREATE TABLE IF NOT EXISTS files_audio
(
    file_id serial,
    object_name text NOT NULL,
    sha256 character varying(64) NOT NULL,
    time timestamptz NOT NULL,
    deployment_id integer NOT NULL REFERENCES deployments (deployment_id),
    duration double precision NOT NULL,
    serial_number character varying(32),
    format character varying(64),
    file_size bigint NOT NULL,
    sample_rate integer NOT NULL,
    bit_depth smallint,
    channels smallint,
    battery real,
    temperature real,
    gain character varying(32),
    filter character varying(64),
    source character varying(32),
    rec_end_status character varying(32),
    comment character varying(64),
    class character varying(32),
    created_at timestamptz NOT NULL DEFAULT current_timestamp,
    updated_at timestamptz NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (file_id),
    UNIQUE (object_name),
    UNIQUE (sha256)
);

CREATE TABLE IF NOT EXISTS storage_backend
(
    storage_id serial NOT NULL,
    url_prefix text NOT NULL,
    type character varying(8),
    priority integer NOT NULL DEFAULT 0,
    notes text,
    created_at timestamptz NOT NULL DEFAULT current_timestamp,
    updated_at timestamptz NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (storage_id),
    UNIQUE (url_prefix)
);

-- One version of a file per backend: the primary key is (file_id, storage_id), and `type`
-- says which version (0 original, 1/2 WebP or FLAC, 10 gzip; see the README).
CREATE TABLE IF NOT EXISTS mm_files_image_storage
(
    file_id integer NOT NULL REFERENCES files_image (file_id),
    storage_id integer NOT NULL REFERENCES storage_backend (storage_id),
    type smallint NOT NULL DEFAULT 0,
    created_at timestamptz,
    updated_at timestamptz DEFAULT current_timestamp,
    PRIMARY KEY (file_id, storage_id)
);

CREATE TABLE IF NOT EXISTS mm_files_audio_storage
(
    file_id integer NOT NULL REFERENCES files_audio (file_id),
    storage_id integer NOT NULL REFERENCES storage_backend (storage_id),
    type smallint NOT NULL DEFAULT 0,
    created_at timestamptz,
    updated_at timestamptz DEFAULT current_timestamp,
    PRIMARY KEY (file_id, storage_id)
);

-- Optional on production (see README, "Indexes"): lets a selection find the files one backend
-- holds without reading every row of the storage table.
CREATE INDEX IF NOT EXISTS mm_files_image_storage_storage_id_idx
    ON mm_files_image_storage (storage_id, file_id);
CREATE INDEX IF NOT EXISTS mm_files_audio_storage_storage_id_idx
    ON mm_files_audio_storage (storage_id, file_id);

-- The fixity log (optional on production, see README "Is everything safe?"): one row per check
-- of one copy. A copy's last check is its newest row; a copy without one was checked when it
-- was written (its storage row's created_at). A copy whose last check found it missing or
-- corrupt counts for nothing until it is written again and checked (rule 8).
CREATE TABLE IF NOT EXISTS storage_fixity (
    check_id   bigserial PRIMARY KEY,
    file_group text NOT NULL,          -- 'image' | 'audio'
    file_id    integer NOT NULL,
    storage_id integer NOT NULL,
    type       smallint NOT NULL,      -- the version checked (see "Versions")
    checked_at timestamptz NOT NULL DEFAULT now(),
    outcome    text NOT NULL,          -- 'ok' | 'missing' | 'corrupt' | 'repaired'
    event      text NOT NULL,          -- 'copy' | 'archive' | 'release' | 'verify' | 'restore' | 'export'
    agent      text NOT NULL,          -- tool and version, user@host (or the token's subject)
    detail     text
);
CREATE INDEX IF NOT EXISTS storage_fixity_copy_idx
    ON storage_fixity (file_group, storage_id, file_id, checked_at);
