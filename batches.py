"""The batches researchers copy and archive: edit this file to add your own.

Each batch has an id (what you type on the command line), a group ('image' or 'audio'), a
description, and a SQL selection that returns the columns file_id, object_name, file_size and
sha256 of the files in the batch, from files_image or files_audio. Write table names without a
schema: the tool sets search_path to the catalog schema (--schema, default 'prod').

The tool adds the source and target conditions itself (which backend holds the file, which
does not yet), so a selection only says *which files* belong to the batch. Write SQL as you
would in psql: a literal percent sign needs no escaping (LIKE 'FS1%' works as it is).

    mitwelten_storage.py info --batches          # lists what is defined here
    mitwelten_storage.py copy -s 1 -t 3 fs1_images --dry-run
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    id: str
    group: str          # 'image' or 'audio'
    description: str
    sql: str            # SELECT file_id, object_name, file_size, sha256 FROM files_image | files_audio …


COLUMNS = 'f.file_id, f.object_name, f.file_size, f.sha256'
TABLES = {'image': 'files_image', 'audio': 'files_audio'}


def quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def files(group: str, where: str = 'TRUE') -> str:
    return f'SELECT {COLUMNS} FROM {TABLES[group]} f WHERE {where}'


def tagged(tag: str) -> str:
    """Condition: the file's deployment carries the tag (e.g. FS1, the first field season)."""
    return f'''f.deployment_id IN (
        SELECT md.deployments_deployment_id FROM mm_tags_deployments md
        JOIN tags t ON t.tag_id = md.tags_tag_id
        WHERE t.name = {quote(tag)})'''


def node_type(kind: str) -> str:
    """Condition: the file was recorded by a node of this type (e.g. 'Pollinator Cam')."""
    return f'''f.deployment_id IN (
        SELECT d.deployment_id FROM deployments d JOIN nodes n ON n.node_id = d.node_id
        WHERE n.type = {quote(kind)})'''


def deployments(*ids: int) -> str:
    """Condition: the file belongs to one of these deployments."""
    return f"f.deployment_id IN ({', '.join(str(int(i)) for i in ids)})"


def period(start: str, end: str) -> str:
    """Condition: the file was recorded in [start, end), ISO dates or timestamps (UTC)."""
    return f"f.time >= {quote(start)}::timestamptz AND f.time < {quote(end)}::timestamptz"


BATCHES = [
    Batch('all_images', 'image', 'every image in the catalog', files('image')),
    Batch('all_audio', 'audio', 'every audio recording in the catalog', files('audio')),

    # By tag: Mitwelten tags deployments by field season and site (FS1 = 2021, FS2 = 2022, FS3 = 2023).
    Batch('fs1_images', 'image', 'images of deployments tagged FS1 (field season 2021)',
          files('image', tagged('FS1'))),
    Batch('fs2_images', 'image', 'images of deployments tagged FS2 (field season 2022)',
          files('image', tagged('FS2'))),
    Batch('fs1_audio', 'audio', 'recordings of deployments tagged FS1 (field season 2021)',
          files('audio', tagged('FS1'))),

    # By node type.
    Batch('pollinator_cams', 'image', "images taken by nodes of type 'Pollinator Cam'",
          files('image', node_type('Pollinator Cam'))),
    Batch('audiomoths', 'audio', "recordings made by nodes of type 'Audiomoth'",
          files('audio', node_type('Audiomoth'))),

    # By deployment ids, as Mitwelten's own archive batches were written.
    Batch('fs3_merian_cams', 'image', 'images of the FS3 Merian Gardens pollinator deployments 1198, 1203, '
          '1215, 1224 and 2150', files('image', deployments(1198, 1203, 1215, 1224, 2150))),

    # By period.
    Batch('images_2021_summer', 'image', 'images taken June to August 2021 (UTC)',
          files('image', period('2021-06-01', '2021-09-01'))),
    Batch('fs1_images_july_2021', 'image', 'FS1 images taken in July 2021 (UTC)',
          files('image', f"{tagged('FS1')} AND {period('2021-07-01', '2021-08-01')}")),
]
