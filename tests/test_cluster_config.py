"""The cluster's configuration keys: checked at start-up, one line and exit 2 when wrong."""

from __future__ import annotations

import pytest
from test_cli import assert_one_line_config_error, clean_env, run_vsproxy

from vsproxy.config import ConfigError, config_from_dict, load_config

TOKEN = "cluster-token-0123456789"


def test_without_redis_url_there_is_no_cluster():
    config = config_from_dict({})
    assert config.cluster.redis_url == ""


def test_redis_url_from_the_environment(tmp_path):
    config = load_config(None, environ={"VSPROXY_REDIS_URL": "redis://127.0.0.1:6390/0"},
                         dotenv_path=tmp_path / "none.env", overrides={"cluster.token": TOKEN})
    assert config.cluster.redis_url == "redis://127.0.0.1:6390/0"


@pytest.mark.parametrize(("tree", "key"), [
    ({"cluster": {"redis_url": "redis://127.0.0.1:6379/0"}}, "cluster.token"),
    ({"cluster": {"redis_url": "redis://127.0.0.1:6379/0", "token": "short"}}, "cluster.token"),
    ({"cluster": {"redis_url": "redis://127.0.0.1:6379/0", "token": TOKEN + "\n"}}, "cluster.token"),
    ({"cluster": {"redis_url": "http://127.0.0.1:6379/", "token": TOKEN}}, "cluster.redis_url"),
    ({"cluster": {"redis_url": "redis://h:6379/0", "token": TOKEN, "advertise_url": "10.0.0.5:8889"}},
     "cluster.advertise_url"),
    ({"cluster": {"redis_url": "redis://h:6379/0", "token": TOKEN, "advertise_url": "http://[10.0.0.5:8889"}},
     "cluster.advertise_url"),
    ({"cluster": {"redis_url": "redis://h:6379/0", "token": TOKEN, "advertise_url": "http://10.0.0.5:88890"}},
     "cluster.advertise_url"),
    ({"cluster": {"redis_url": "redis://h:6379/0", "token": TOKEN}, "sessions": {"store": "sqlite:/tmp/x.db"}},
     "sessions.store"),
    ({"cluster": {"redis_url": "redis://h:6379/0", "token": TOKEN}, "server": {"host": "0.0.0.0"}},
     "cluster.advertise_url"),
    ({"cluster": {"redis_url": "redis://h:6379/0", "token": TOKEN}, "server": {"host": "::"}},
     "cluster.advertise_url"),
])
def test_bad_cluster_settings_name_the_key(tree, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    assert info.value.key == key
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize("url", ["http://:hunter2-secret@127.0.0.1:6379/", "redis://:hunter2-secret@[::1:6379/0",
                                 "redis://:hunter2-secret@127.0.0.1:99999/0",
                                 # A URL parser takes the password's '/', '?', '#' for the end of the
                                 # host: before, the message showed the password whole or in part.
                                 "redis://:hunter2/secret@127.0.0.1:16379/0", "redis://:hunter2?secret@h",
                                 "redis://:hunter2#secret@127.0.0.1:6379/0"])
def test_a_bad_redis_url_does_not_show_its_password(url):
    """Not a Redis URL, or one the Redis client cannot parse (before, a traceback at start-up)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"cluster": {"redis_url": url, "token": TOKEN}})
    assert info.value.key == "cluster.redis_url"
    assert "hunter2" not in str(info.value) and "secret" not in str(info.value), str(info.value)


@pytest.mark.slow
def test_redis_url_without_token_exits_2_with_one_line(tmp_path):
    result = run_vsproxy(["--host", "127.0.0.1"], tmp_path,
                         env=clean_env(VSPROXY_REDIS_URL="redis://127.0.0.1:1/0"))
    assert_one_line_config_error(result, "cluster.token")


def test_node_settings_and_token_from_the_environment(tmp_path):
    """What deploy/docker-compose.yml sets per node container; the token from an env file."""
    config = load_config(None, environ={"VSPROXY_REDIS_URL": "redis://redis:6379/0", "VSPROXY_NODE_ID": "node2",
                                        "VSPROXY_ADVERTISE_URL": "http://node2:8889", "VSPROXY_CLUSTER_TOKEN": TOKEN},
                         dotenv_path=tmp_path / "none.env")
    assert (config.cluster.node_id, config.cluster.advertise_url, config.cluster.token) == (
        "node2", "http://node2:8889", TOKEN)


@pytest.mark.parametrize(("server", "advertise_url", "node_id", "url"), [
    ({"host": "0.0.0.0", "port": 8889}, "http://10.0.0.5:8889/", "10.0.0.5:8889", "http://10.0.0.5:8889"),
    ({"host": "127.0.0.1", "port": 9000}, "", "127.0.0.1:9000", "http://127.0.0.1:9000"),
    ({"host": "::1", "port": 9000}, "", "[::1]:9000", "http://[::1]:9000"),
])
def test_a_node_is_named_by_where_the_others_reach_it(server, advertise_url, node_id, url):
    """Without cluster.node_id a node is named by its advertised host:port, unique in the cluster.
    Before, every node listening on a wildcard address (as in containers) was named
    127.0.0.1:<port> and advertised http://127.0.0.1:<port>: the nodes took themselves for one,
    each holding every lease at once (found by review); now such a node needs advertise_url."""
    from vsproxy.cluster.node import Cluster

    config = config_from_dict({"server": server, "cluster": {"redis_url": "redis://127.0.0.1:1/0", "token": TOKEN,
                                                            "advertise_url": advertise_url}})
    node = Cluster(config)
    assert (node.node_id, node.advertise_url) == (node_id, url)
