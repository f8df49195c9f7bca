"""One source per fact: the README's configuration reference and the shipped config.yaml are
checked against the schema's own field metadata, so a key cannot be documented in one place
and not another."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from vsproxy import sources
from vsproxy.config import config_from_dict, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_readme_configuration_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- config-reference:[^>]*-->\n(.*?)<!-- end of config-reference -->", readme, re.S)
    assert match, "README.md lacks the generated configuration reference"
    assert match.group(1) == reference_markdown(), "README is stale: regenerate with `python -m vsproxy.config`"


def test_reference_lists_every_key_of_every_upstream_kind():
    reference = reference_markdown()
    for kind in sources.KINDS:
        for f in dataclasses.fields(sources.source_class(kind).settings_class):
            assert f"| `upstreams.<name>.{f.name}` |" in reference and f"(`{kind}`)" in reference


def test_config_yaml_shows_every_upstream_kind_with_all_its_keys():
    """The commented example under `upstreams` parses, validates, and shows every key of every kind."""
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    block = re.search(r"^#   upstreams:\n((?:#     .*\n)+)", text, re.M)
    assert block, "config.yaml lacks the commented upstreams example"
    example = yaml.safe_load("".join(line[5:] + "\n" for line in block.group(1).splitlines()))
    by_kind = {entry["kind"]: entry for entry in example.values()}
    assert set(by_kind) == set(sources.KINDS)
    for kind, entry in by_kind.items():
        keys = {f.name for f in dataclasses.fields(sources.source_class(kind).settings_class)}
        given = set(entry) - {"kind", "h264"}
        assert given == keys, f"config.yaml's {kind} example: {sorted(keys ^ given)}"
    # ...and it is a valid configuration once its placeholders (secrets) are replaced.
    filled = re.sub(r'"<[^">]*>"', '"' + "r4nd0m-" * 4 + '"', block.group(1))
    config_from_dict({"upstreams": yaml.safe_load("".join(line[5:] + "\n" for line in filled.splitlines()))})


def test_openapi_enums_come_from_the_registries():
    from vsproxy.openapi import openapi_document
    from vsproxy.outputs import WS_FORMATS

    doc = openapi_document("http://127.0.0.1:8889")
    text = repr(doc)
    assert repr(list(sources.KINDS)) in text
    assert repr(list(WS_FORMATS)) in text


def test_the_security_example_copied_as_it_stands_is_refused_until_its_placeholders_are_replaced():
    """The README's security example has a placeholder for every secret; a deployment that copies
    it verbatim does not start with secrets everyone has read (one line naming the key), and
    starts once each placeholder is a random value."""
    import re
    import secrets

    from vsproxy.config import ConfigError, config_from_dict

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Security\n.*?```yaml\n(.*?)```", readme, re.S)
    assert block, "README.md lacks the security example"
    tree = yaml.safe_load(block.group(1))
    tree.pop("tls")  # its example files do not exist here
    placeholders = re.findall(r'"<[^">]*>"', block.group(1))
    assert len(placeholders) >= 4, "every secret of the example is a placeholder"
    auth = tree["auth"]
    replace = {  # in the order they are checked: replacing one has the next refused
        "auth.api_tokens[0]": lambda: auth.update(api_tokens=[secrets.token_urlsafe(32)]),
        "auth.viewer_tokens.secret": lambda: auth["viewer_tokens"].update(secret=secrets.token_urlsafe(32)),
        "auth.metrics_token": lambda: auth.update(metrics_token=secrets.token_urlsafe(32)),
        "auth.operators.admin": lambda: auth["operators"].update(admin=secrets.token_urlsafe(12)),
    }
    for secret_key, replace_it in replace.items():
        with pytest.raises(ConfigError) as info:
            config_from_dict(tree)
        assert info.value.key == secret_key and "placeholder" in str(info.value)
        replace_it()
    config_from_dict(tree)


def test_the_cluster_examples_copied_as_they_stand_are_refused():
    """The README's cluster example and deploy/.env.example name a cluster token everyone has
    read: a node started with either as it stands exits naming cluster.token (before, both
    were accepted as real secrets: found by a new-user walkthrough)."""
    import re

    from vsproxy.config import ConfigError, config_from_dict

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Running a cluster\n.*?```yaml\n(.*?)```", readme, re.S)
    assert block, "README.md lacks the cluster example"
    env = dict(line.split("=", 1) for line in (ROOT / "deploy" / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    for token in (yaml.safe_load(block.group(1))["cluster"]["token"], env["VSPROXY_CLUSTER_TOKEN"]):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"cluster": {"redis_url": "redis://127.0.0.1:6379/0", "token": token}})
        assert info.value.key == "cluster.token" and "placeholder" in str(info.value), token
    config_from_dict({"cluster": {"redis_url": "redis://127.0.0.1:6379/0", "token": "r4nd0m-" * 4}})
