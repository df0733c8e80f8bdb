"""The deploy log: what the meta repo records of each agent (its pinned config), and the one lock
under which the applied repos and the meta repo change.

Spawns, revivals, rebuilds and destroys are recorded here by the lifecycle; approved deploys
stage and commit their pins through `meta` under `lock` (core/approvals.py).
"""

from __future__ import annotations

import trio

from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.containers.nixgen import MetaAgent
from hyperhive.core.gitops import BRANCH, GitOps
from hyperhive.core.meta import MetaRepo, Pin, spawn_message


class DeployLog:
    def __init__(self, gitops: GitOps, meta: MetaRepo, registry: Registry) -> None:
        self.gitops = gitops
        self.meta = meta
        self.registry = registry
        self.lock = trio.Lock()
        """One transition at a time: approvals and rebuilds share the applied repos, the meta
        repo's staged pin and the rollback bookkeeping."""

    async def record_spawn(self, rec: AgentRecord, revived: bool) -> None:
        """The meta repo learns of a new (or revived) agent, pinned at its applied `main`."""
        repo = self.gitops.applied(rec.name)
        sha = await self.gitops.resolve(repo, BRANCH)
        if sha is None:
            return
        tag = await self.deployed_tag(rec.name, BRANCH) if revived else "deployed/0"
        message = spawn_message(rec.name, tag, sha)
        if revived:
            message = f"revive {rec.name} {tag} {sha[:12]}"
        await self.meta.record(message, rec.name, Pin(rev=sha, tag=tag), self.meta_agent(rec))

    async def deployed_tag(self, name: str, sha: str) -> str:
        """The newest `deployed/<id>` tag at `sha` in the agent's applied repo (`deployed/0`,
        its first config, when none is)."""
        repo = self.gitops.applied(name)
        tags = await self.gitops.out(repo, "tag", "--points-at", sha, "--list", "deployed/*")
        ids = [int(t.split("/")[1]) for t in tags.split() if t.split("/")[1].isdigit()]
        return f"deployed/{max(ids, default=0)}"

    async def record_rebuild(self, name: str) -> None:
        """A rebuild outside approvals may relock the agent's input (nixos): commit that alone.

        Under the lock, so a deploy's staged pin is never swept into this commit.
        """
        async with self.lock:
            await self.meta.finalize(f"rebuild {name}")

    async def record_destroy(self, name: str) -> None:
        """The agent leaves the meta repo (a no-op when it never got there)."""
        await self.meta.record(f"destroy {name}", name, None)

    async def leave(self, name: str) -> None:
        """Undoing a spawn: the agent leaves the meta repo if it got as far as that."""
        if name in await self.meta.pins() or name in await self.meta.pins(committed=False):
            await self.record_destroy(name)

    async def sync(self) -> None:
        """At start-up: every live agent is in the meta repo (agents from before it existed)."""
        await self.meta.ensure()
        pins = await self.meta.pins()
        for rec in self.registry.all():
            if rec.alive and rec.role == "agent" and rec.name not in pins:
                await self.gitops.seed(rec.name)
                await self.record_spawn(rec, revived=False)

    def meta_agent(self, rec: AgentRecord) -> MetaAgent:
        return MetaAgent(
            name=rec.name,
            container=rec.container,
            role=rec.role,
            port=rec.port,
            applied=str(self.gitops.applied(rec.name)),
        )
