"""CPU thread defaults of ``ldm.env``: each process gets its share of the cores, a variable overrides it."""

import os

import pytest

from ldm import env

CPUS = len(os.sched_getaffinity(0))


@pytest.fixture
def clean_env(monkeypatch):
    for name in (env.CPU_THREADS_VAR, *env.LAUNCHER_VARS, *env.LOCAL_WORKER_VARS):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_single_process_gets_all_its_cpus(clean_env):
    assert env.default_cpu_threads() == CPUS


def test_msrun_workers_share_the_cpus(clean_env):
    clean_env.setenv("MS_ROLE", "MS_WORKER")
    clean_env.setenv("MS_WORKER_NUM", "2")
    assert env.default_cpu_threads() == max(1, CPUS // 2)
    clean_env.setenv("MS_WORKER_NUM", str(4 * CPUS))
    assert env.default_cpu_threads() == 1


def test_worker_count_without_a_launcher_is_ignored(clean_env):
    clean_env.setenv("MS_WORKER_NUM", str(2 * CPUS))
    assert env.default_cpu_threads() == CPUS


def test_variable_overrides_and_is_checked(clean_env):
    clean_env.setenv("MS_ROLE", "MS_WORKER")
    clean_env.setenv("MS_WORKER_NUM", "2")
    clean_env.setenv(env.CPU_THREADS_VAR, "3")
    assert env.default_cpu_threads() == 3
    for bad in ("0", "two", "-1"):
        clean_env.setenv(env.CPU_THREADS_VAR, bad)
        with pytest.raises(ValueError, match=env.CPU_THREADS_VAR):
            env.default_cpu_threads()
