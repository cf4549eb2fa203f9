"""Launch environments: torchrun and Slurm (incl. multi-node hostlists), pure env mappings."""
from __future__ import annotations

import pytest

from r1mega.parallel.launch_env import LaunchEnvError, expand_nodelist, read_launch_env


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("x[1,3],y[10-11]", ["x1", "x3", "y10", "y11"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("h1,h2", ["h1", "h2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]01[", "gpu[3-1]", "gpu[a-b]", ""])
def test_bad_nodelist_is_named(bad):
    with pytest.raises(LaunchEnvError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "29400"}
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (5, 8, 1, "10.0.0.2", 29400, "torchrun")
    assert e.init_method == "tcp://10.0.0.2:29400"


def test_torchrun_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
    assert read_launch_env(env).launcher == "torchrun"


def test_slurm_multi_node_master_is_first_host():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_JOB_ID": "123456"}
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == \
        (9, 16, 1, "gpu01", "slurm")
    assert e.master_port == 20000 + 123456 % 20000


def test_slurm_explicit_master_and_mixed_nodelist():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "a[1-2],b3", "MASTER_PORT": "1234"}
    e = read_launch_env(env)
    assert (e.master_addr, e.master_port) == ("a1", 1234)
    env["MASTER_ADDR"] = "login7"
    assert read_launch_env(env).master_addr == "login7"


def test_single_process_default():
    e = read_launch_env({})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (0, 1, 0, "single")


@pytest.mark.parametrize("env,match", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST"),
])
def test_bad_environment_is_named(env, match):
    with pytest.raises(LaunchEnvError, match=match):
        read_launch_env(env)
