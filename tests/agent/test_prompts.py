"""The system prompts as the harness renders them from its environment: the hive's forge is in
them exactly when the container was told of one (HIVE_FORGE_URL), and every placeholder is
filled."""

from __future__ import annotations

import re

import pytest

from hyperhive.agent.settings import HarnessSettings, system_prompt

FORGE_ENV = {"HIVE_FORGE_URL": "http://localhost:3000", "HIVE_FORGE_ORG": "lab"}


def render(role: str, **env: str) -> str:
    label = "hm1nd" if role == "manager" else "alice"
    return system_prompt(HarnessSettings.from_env(role, {"HIVE_LABEL": label, **env}))


@pytest.mark.parametrize("role", ["agent", "manager"])
def test_without_a_forge_the_prompt_does_not_mention_one(role: str) -> None:
    text = render(role)
    assert "forge" not in text.lower() and "tea" not in text.split()
    assert not re.search(r"\{[a-z_]+\}", text)
    assert text.endswith("20 in a row.\n" if role == "agent" else "20 in a row).\n")


@pytest.mark.parametrize("role", ["agent", "manager"])
def test_with_a_forge_the_prompt_says_what_it_is_for_and_how_to_use_it(role: str) -> None:
    label = "hm1nd" if role == "manager" else "alice"
    text = render(role, **FORGE_ENV)
    assert not re.search(r"\{[a-z_]+\}", text)
    forge = text[text.index("The hive's forge") :]
    # What it is for: shared repos, issues and pull requests; the config mirrors, read-only.
    for said in ("repositories, issues, pull requests", "read-only mirrors", "nobody pushes"):
        assert said in " ".join(forge.split())
    # How to use it: tea, the REST API and git with the agent's own token.
    assert "at http://localhost:3000:" in forge
    assert f"Your user there is `{label}`" in forge
    assert "`/state/forge-token`" in forge
    assert "tea login add --name hive --url http://localhost:3000" in forge
    assert "http://localhost:3000/api/v1/user/repos" in forge
    assert f"echo username={label};" in forge
    assert "`lab/<agent>`" in forge and "`lab/meta`" in forge
    # Everything before it is the prompt without a forge.
    assert text.startswith(render(role))
