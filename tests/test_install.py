"""Installable as Python tools are: the batches file found as SPEC.md says (--batches FILE, else
$MITWELTEN_BATCHES, else ./batches.py, else the shipped one), pyproject.toml agreeing with the
requirements files, and the project installed with pip into a fresh venv, its commands run from
another folder (slow: one venv for the module, the pinned dependencies from PyPI or pip's cache)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import mitwelten_storage as ms
from conftest import ROOT, batches_py

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

MY_BATCHES = batches_py(
    "Batch('mine', 'image', 'my own selection', 'SELECT file_id, object_name, file_size, sha256 FROM files_image')",
    "Batch('broken', 'image', 'a selection with a typo', 'SELECT file_id FROM files_imag')")


def batches_file(folder: Path, name: str = 'batches.py') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(MY_BATCHES)
    return path


def listed_ids(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines()[1:]]


# --- which batches file ---------------------------------------------------------------------------

def test_batches_option_then_environment_then_current_folder_then_shipped(world, tmp_path):
    given = batches_file(tmp_path / 'given', 'selections.py')
    from_env = batches_file(tmp_path / 'env', 'env_batches.py')
    here = tmp_path / 'here'
    batches_file(here)
    nowhere = tmp_path / 'nowhere'
    nowhere.mkdir()
    env = {'MITWELTEN_BATCHES': str(from_env)}

    result = world.cli('--batches', given, 'info', '--batches', env=env, cwd=here)
    assert result.returncode == 0, result.stderr
    assert listed_ids(result.stdout) == ['mine', 'broken']
    assert f'batches from {given} (--batches)' in result.stderr

    result = world.cli('info', '--batches', env=env, cwd=here)
    assert result.returncode == 0 and f'batches from {from_env} (MITWELTEN_BATCHES)' in result.stderr

    result = world.cli('info', '--batches', unset=('MITWELTEN_BATCHES',), cwd=here)
    assert result.returncode == 0 and listed_ids(result.stdout) == ['mine', 'broken']
    assert f'batches from {here / "batches.py"} (the current folder)' in result.stderr

    result = world.cli('info', '--batches', unset=('MITWELTEN_BATCHES',), cwd=nowhere)
    assert result.returncode == 0
    assert 'all_images' in listed_ids(result.stdout) and 'mine' not in listed_ids(result.stdout)
    assert f'batches from {ROOT / "batches.py"} (shipped with the tool)' in result.stderr


def test_batches_json_stays_a_list_and_stdout_holds_only_it(world, tmp_path):
    import json
    given = batches_file(tmp_path)
    result = world.cli('--batches', given, 'info', '--batches', '--json')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {'id': 'mine', 'group': 'image', 'description': 'my own selection'},
        {'id': 'broken', 'group': 'image', 'description': 'a selection with a typo'}]
    assert str(given) in result.stderr


def test_a_missing_batches_file_is_a_usage_error_naming_it(world, tmp_path):
    missing = tmp_path / 'no-such-batches.py'
    result = world.cli('--batches', missing, 'info', '--batches')
    assert result.returncode == 2
    assert f'{missing} (named by --batches) not found' in result.stderr and 'Traceback' not in result.stderr
    result = world.cli('copy', '-s', '1', '-t', '2', 'all_images', env={'MITWELTEN_BATCHES': str(missing)})
    assert result.returncode == 2
    assert f'{missing} (named by MITWELTEN_BATCHES) not found' in result.stderr
    result = world.cli('--batches', tmp_path, 'info', '--batches')
    assert result.returncode == 2 and f'{tmp_path} is a folder' in result.stderr


def test_batch_errors_name_the_file_read(world, tmp_path):
    given = batches_file(tmp_path / 'mine', 'selections.py')
    result = world.cli('--batches', given, 'copy', '-s', '1', '-t', '2', 'all_images')
    assert result.returncode == 2
    assert f"unknown batch 'all_images'; {given} defines: broken, mine" in result.stderr
    storage_id, _disk = world.create_local_backend()
    result = world.cli('--batches', given, 'verify', storage_id, 'broken')
    assert result.returncode == 2, result.stderr
    assert f"batch 'broken' ({given}) cannot be selected" in result.stderr and 'files_imag' in result.stderr
    (tmp_path / 'mine' / 'selections.py').write_text('BATCHES = [\n')
    result = world.cli('--batches', given, 'info', '--batches')
    assert result.returncode == 2 and f'{given} cannot be loaded: SyntaxError' in result.stderr


# --- pyproject.toml and the requirements files -----------------------------------------------------

def requirements(name: str) -> set[str]:
    """The requirements a file pins itself (not those of a file it includes with -r), normalized."""
    lines = (line.split('#', 1)[0].strip() for line in (ROOT / name).read_text().splitlines())
    return {normalized(line) for line in lines if line and not line.startswith('-')}


def normalized(text: str) -> str:
    requirement = Requirement(text)
    requirement.name = canonicalize_name(requirement.name)
    return str(requirement)


def test_pyproject_pins_what_the_requirements_files_pin():
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    assert {normalized(r) for r in project['dependencies']} == requirements('requirements.txt')
    assert {normalized(r) for r in project['optional-dependencies']['service']} == \
        requirements('requirements-service.txt')
    assert project['scripts'] == {'mitwelten-storage': 'mitwelten_storage:console_main',
                                  'mitwelten-service': 'mitwelten_service:main'}


# --- installed with pip, run from another folder ---------------------------------------------------

@dataclasses.dataclass
class Installed:
    venv: Path
    elsewhere: Path     # a folder with no batches.py and nothing of the checkout

    def run(self, command: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'MITWELTEN_BATCHES', 'MITWELTEN_DB', 'MITWELTEN_DB_SCHEMA')}
        return subprocess.run([str(self.venv / 'bin' / command), *map(str, args)], cwd=self.elsewhere, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def pip_install(self, what: str) -> None:
        result = self.run('python', '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', what,
                          timeout=1800)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """The project installed from the checkout into a fresh venv, as `pip install .` does; removed
    afterwards (a few hundred MB that pytest would otherwise keep for three sessions)."""
    root = tmp_path_factory.mktemp('installed')
    try:
        subprocess.run([sys.executable, '-m', 'venv', str(root / 'venv')], check=True, timeout=300)
        (root / 'elsewhere').mkdir()
        tool = Installed(root / 'venv', root / 'elsewhere')
        tool.pip_install(str(ROOT))
        yield tool
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_installed_tool_runs_from_another_folder_with_its_shipped_batches(installed):
    result = installed.run('mitwelten-storage', '--help')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: mitwelten-storage ') and '--batches FILE' in result.stdout

    result = installed.run('mitwelten-storage', 'info', '--batches')
    assert result.returncode == 0, result.stderr
    assert {'all_images', 'all_audio', 'fs1_images'} <= set(listed_ids(result.stdout))
    shipped = result.stderr.split('batches from ', 1)[1].split(' (shipped with the tool)', 1)[0]
    assert Path(shipped).parts[-2:] == ('mitwelten_storage_data', 'batches.py')
    assert Path(shipped).is_relative_to(installed.venv) and Path(shipped).read_text() == \
        (ROOT / 'batches.py').read_text()
    # the module is the installed one, and no top-level module `batches` lands in site-packages
    result = installed.run('python', '-c', 'import importlib.util, mitwelten_storage; '
                                           'print(mitwelten_storage.__file__, importlib.util.find_spec("batches"))')
    module, batches_spec = result.stdout.split()
    assert Path(module).is_relative_to(installed.venv) and batches_spec == 'None'
    # the package's version is the module's
    result = installed.run('python', '-c', 'import importlib.metadata as m; print(m.version("mitwelten-storage"))')
    assert result.stdout.strip() == ms.__version__


def test_installed_init_db_finds_its_schema(installed, services, world):
    schema = f'mwtest_install_{uuid.uuid4().hex[:8]}'
    try:
        result = installed.run('mitwelten-storage', '--db', services.pg_dsn, '--schema', schema, 'init-db')
        assert result.returncode == 0, result.stderr
        assert f"catalog schema '{schema}' is ready" in result.stdout
        tables = 'SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1'
        # the same tables as the checkout's sql/schema.sql makes (world's schema)
        assert world.query(tables, (schema,)) == world.query(tables, (world.schema,))
        assert ('files_image',) in world.query(tables, (schema,))
    finally:
        with contextlib.closing(psycopg2.connect(services.pg_dsn)) as admin:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_installed_service_command_needs_its_extra(installed):
    result = installed.run('mitwelten-service', '--help')
    assert result.returncode == 2
    assert "service extra" in result.stderr and 'Traceback' not in result.stderr
    installed.pip_install(f'{ROOT}[service]')
    result = installed.run('mitwelten-service', '--help')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: mitwelten-service ') and '--workers' in result.stdout
